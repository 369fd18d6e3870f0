"""Job workspace benchmark: how long a job waits for its /workspace on a large repository.

Makes a synthetic repository generation — ``--files`` files (default 50,000) totalling
``--mib`` MiB (default 1024) in nested directories, optionally committed with git
(``--with-git``, which adds its .git) — then, for each mode, prepares a job workspace from it
with the gateway's own code (``JobWorkspaces.from_clone``) and mounts it in a throwaway
container of the session image that lists it (what the job's container start does):

  baseline  an empty named volume made and mounted the same way (what every session pays)
  overlay   an overlay volume on the generation (the clone read-only below, the job above)
  copy      cp -a --reflink=auto into the job's directory, bound into a volume (a reflink
            clone on XFS/Btrfs, a full copy here on ext4), page cache warm
  copy-cold the same after dropping the page cache (``--cold``; needs root)
  reflink   ``--xfs``: the same copy on a loop-mounted XFS filesystem made with reflink=1
            (needs root and mkfs.xfs, from xfsprogs), where cp --reflink=auto clones extents

Prints p50/p95/p99 in ms and the ratio to the baseline. The directories are made under
``--dir`` (default a temporary directory in /var/tmp: on the same filesystem for both layers).

Usage: .venv/bin/python scripts/bench_workspaces.py [--files 50000] [--mib 1024]
       [--runs 10] [--copy-runs 3] [--cold] [--xfs] [--with-git]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.batch_config import WorkspaceMode
from gateway.config import Settings
from gateway.services.job_workspace import JobWorkspaces
from gateway.services.runtime.docker import DockerRuntime

IMAGE = "ccgate-session:latest"


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (milliseconds)."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def row(name: str, values: list[float], baseline: list[float]) -> str:
    """One table row: p50 / p95 / p99 in ms, and the p50 ratio to the baseline."""
    ratio = pct(values, 50) / pct(baseline, 50)
    return (
        f"{name:<12} {len(values):>4} {pct(values, 50):9.0f} {pct(values, 95):9.0f} "
        f"{pct(values, 99):9.0f}   x{ratio:.2f}"
    )


def make_tree(root: Path, files: int, mib: int, with_git: bool) -> int:
    """``files`` files of about ``mib`` MiB in all, 100 per directory; returns the bytes."""
    size = max(1, mib * 1024 * 1024 // files)
    block = os.urandom(size)
    total = 0
    for n in range(files):
        directory = root / f"d{n // 10000:02d}" / f"s{(n // 100) % 100:02d}"
        if n % 100 == 0:
            directory.mkdir(parents=True, exist_ok=True)
        data = block[n % 997 :] + block[: n % 997]
        (directory / f"f{n:06d}.bin").write_bytes(data)
        total += len(data)
    if with_git:
        env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.org",
               "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.org"}  # fmt: skip
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "bench"]):
            subprocess.run(["git", *args], cwd=root, env=env, check=True)
    return total


def prepare_repository(clone: Path, files: int, mib: int, with_git: bool) -> tuple[int, int]:
    """The synthetic generation, owned by the session user as a real one is; returns (bytes of
    content, bytes on disk)."""
    total = make_tree(clone, files, mib, with_git)
    subprocess.run(["chown", "-R", "1000:1000", str(clone)], check=False)
    du = subprocess.run(["du", "-sb", str(clone)], capture_output=True, text=True, check=True)
    return total, int(du.stdout.split()[0])


def mount_xfs(base: Path, size_gib: int) -> Path:
    """A sparse image file formatted XFS (reflink=1), loop-mounted at ``base/xfs``."""
    image, mount = base / "xfs.img", base / "xfs"
    mount.mkdir()
    subprocess.run(["truncate", "-s", f"{size_gib}G", str(image)], check=True)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    return mount


def clean_up(base: Path) -> None:
    """Unmount the XFS image if mounted and remove everything the benchmark made."""
    if (base / "xfs").is_mount():
        subprocess.run(["umount", str(base / "xfs")], check=False)
    shutil.rmtree(base, ignore_errors=True)


def drop_caches() -> None:
    """Write back and drop the page cache (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


async def measure(
    workspaces: JobWorkspaces,
    runtime: DockerRuntime,
    clone: Path | None,
    runs: int,
    cold: bool = False,
) -> list[float]:
    """Milliseconds from nothing to a container that has the workspace mounted and listed."""
    samples: list[float] = []
    for _ in range(runs):
        job_id = f"bench-{uuid.uuid4().hex[:8]}"
        if cold:
            drop_caches()
        started = time.perf_counter()
        if clone is None:
            volume = f"ccgate-bench-{job_id}"
            await runtime.create_volume(volume, {})
            await runtime.check_volume(volume, image=IMAGE)
            samples.append((time.perf_counter() - started) * 1000)
            await runtime.remove_volume(volume)
            continue
        ws = await workspaces.from_clone(job_id, "bench", clone)
        await runtime.check_volume(ws.volume, image=IMAGE)
        samples.append((time.perf_counter() - started) * 1000)
        await workspaces.remove(job_id, ws)
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--copy-runs", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="also copy with a cold page cache")
    parser.add_argument("--xfs", action="store_true", help="also on XFS with reflinks")
    parser.add_argument("--with-git", action="store_true")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="ccgate-bench-ws-", dir=args.dir or "/var/tmp"))
    runtime = DockerRuntime(deployment=f"bench-{uuid.uuid4().hex[:6]}")
    try:
        clone = base / "repositories" / "r" / "g1"
        clone.mkdir(parents=True)
        began = time.perf_counter()
        total, on_disk = await asyncio.to_thread(
            prepare_repository, clone, args.files, args.mib, args.with_git
        )
        made = time.perf_counter() - began
        print(f"repository: {args.files} files, {total / 2**20:.0f} MiB of content, "
              f"{on_disk / 2**20:.0f} MiB on disk (made in {made:.1f} s)")  # fmt: skip

        def workspaces(mode: WorkspaceMode) -> JobWorkspaces:
            settings = Settings(
                data_dir=base,
                repos_dir=base / "repositories",
                jobs_dir=base / "jobs",
                job_workspace_mode=mode,
                image=IMAGE,
            )
            return JobWorkspaces(settings, runtime)

        overlay = workspaces(WorkspaceMode.OVERLAY)
        copy = workspaces(WorkspaceMode.COPY)
        results: list[tuple[str, list[float]]] = []
        baseline = await measure(overlay, runtime, None, args.runs)
        results.append(("baseline", baseline))
        results.append(("overlay", await measure(overlay, runtime, clone, args.runs)))
        results.append(("copy", await measure(copy, runtime, clone, args.copy_runs)))
        if args.cold:
            results.append(("copy-cold", await measure(copy, runtime, clone, args.copy_runs, True)))
        if args.xfs:
            xfs = await asyncio.to_thread(mount_xfs, base, max(4, args.mib * 3 // 1024 + 2))
            xfs_clone = xfs / "repositories" / "r" / "g1"
            xfs_clone.mkdir(parents=True)
            await asyncio.to_thread(prepare_repository, xfs_clone, args.files, args.mib, False)
            reflink = JobWorkspaces(
                Settings(
                    data_dir=xfs,
                    repos_dir=xfs / "repositories",
                    jobs_dir=xfs / "jobs",
                    job_workspace_mode=WorkspaceMode.COPY,
                    image=IMAGE,
                ),
                runtime,
            )
            results.append(("reflink", await measure(reflink, runtime, xfs_clone, args.runs)))
        print(f"{'mode':<12} {'runs':>4} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9}   vs baseline")
        for name, values in results:
            print(row(name, values, baseline))
    finally:
        await runtime.close()
        await asyncio.to_thread(clean_up, base)


if __name__ == "__main__":
    asyncio.run(main())
