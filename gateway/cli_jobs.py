"""``ccgate run`` and ``ccgate jobs ls|show|cancel|files|get|rm``: batch jobs from the command
line (a thin client of ``/api/v1/jobs``; ``CCGATE_URL`` and ``CCGATE_TOKEN`` as for ``ccgate
chat``). ``run --wait`` prints the job's streamed events, then its result."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx
from websockets.asyncio.client import connect

from gateway.cli_client import TOKEN_OPTION as _TOKEN
from gateway.cli_client import URL_OPTION as _URL
from gateway.cli_client import answer, client
from gateway.cli_render import render

FINAL = {"completed", "failed", "git_failed", "timeout", "cancelled"}


def describe(job: dict[str, Any]) -> str:
    """A job in a few lines."""
    position = f" (position {job['queue_position']})" if job.get("queue_position") else ""
    lines = [f"{job['id']}  {job['status']}{position}", f"  prompt  {job['prompt'][:100]}"]
    for label, key in (("session", "session_id"), ("commit", "git_commit"), ("git", "git_status"),
                       ("cost", "cost_usd"), ("error", "error")):  # fmt: skip
        if job.get(key) is not None:
            lines.append(f"  {label:<7} {job[key]}")
    if job.get("files"):
        lines.append("  files   " + ", ".join(f["name"] for f in job["files"]))
    return "\n".join(lines)


def split_ref(spec: str) -> tuple[str, str | None]:
    """``URL@REF`` → (URL, REF); an ``@`` before the last ``/`` or ``:`` belongs to the URL
    (``git@host:org/repo``)."""
    at = spec.rfind("@")
    if at > max(spec.rfind("/"), spec.rfind(":")):
        return spec[:at], spec[at + 1 :] or None
    return spec, None


def _source(repo: str | None, git_ref: str | None, zip_file: Path | None) -> dict[str, Any]:
    chosen = [x for x in (repo, git_ref, zip_file) if x is not None]
    if len(chosen) > 1:
        raise click.UsageError("choose one of --repo, --git, --zip")
    if repo is not None:
        return {"type": "repository", "repository": repo}
    if git_ref is not None:
        url, _, ref = (
            git_ref.rpartition("@") if "@" in git_ref.split("/")[-1] else (git_ref, "", "")
        )
        return {"type": "git", "url": url or git_ref, "ref": ref or None}
    if zip_file is not None:
        return {"type": "zip"}
    return {"type": "empty"}


@click.command()
@click.option("-p", "--prompt", required=True, help="The prompt; {{name}} names an uploaded file.")
@click.option("--repo", default=None, help="A registered repository's name.")
@click.option("--git", "git_ref", default=None, help="A git URL, optionally @REF.")
@click.option("--zip", "zip_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--file", "files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path))  # fmt: skip
@click.option("--schema", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON Schema file for a structured result.")  # fmt: skip
@click.option("--model", default=None)
@click.option("--timeout", "timeout_s", type=int, default=None, help="Seconds.")
@click.option("--tag", "tags", multiple=True)
@click.option("--wait/--no-wait", default=False, help="Stream the events and wait for the end.")
@_URL
@_TOKEN
def run(
    prompt: str,
    repo: str | None,
    git_ref: str | None,
    zip_file: Path | None,
    files: tuple[Path, ...],
    schema: Path | None,
    model: str | None,
    timeout_s: int | None,
    tags: tuple[str, ...],
    wait: bool,
    url: str,
    tok: str | None,
) -> None:
    """Submit a job: PROMPT on a repository, a git URL, a zip or an empty workspace."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "source": _source(repo, git_ref, zip_file),
        "tags": list(tags),
        "start": not (files or zip_file),
    }
    if schema is not None:
        body["json_schema"] = json.loads(schema.read_text())
    if model:
        body["model"] = model
    if timeout_s:
        body["timeout_s"] = timeout_s
    with client(url, tok) as http:
        job = answer(http.post("/jobs", json=body), 201)
        if files:
            uploads = [("files", (f.name, f.read_bytes())) for f in files]
            answer(http.post(f"/jobs/{job['id']}/files", files=uploads), 200)
        if zip_file is not None:
            answer(
                http.put(
                    f"/jobs/{job['id']}/workspace",
                    files={"file": (zip_file.name, zip_file.read_bytes())},
                ),
                200,
            )
        if not body["start"]:
            job = answer(http.post(f"/jobs/{job['id']}/start"), 202)
        click.echo(describe(job))
        if not wait:
            return
        session_id = _await_session(http, job["id"])
        if session_id is not None:
            asyncio.run(_follow(url, tok or "", session_id))
        while (job := answer(http.get(f"/jobs/{job['id']}"), 200))["status"] not in FINAL:
            time.sleep(0.5)
    click.echo(describe(job))
    if job.get("structured_output") is not None:
        click.echo(json.dumps(job["structured_output"], indent=2))
    elif job.get("result"):
        click.echo(job["result"])
    sys.exit(0 if job["status"] == "completed" else 1)


def _await_session(http: httpx.Client, job_id: str) -> str | None:
    """The job's session id once it has one; None when it ended without one."""
    while True:
        job = answer(http.get(f"/jobs/{job_id}"), 200)
        if job["session_id"] or job["status"] in FINAL:
            return job["session_id"]  # type: ignore[no-any-return]
        time.sleep(0.5)


async def _follow(url: str, tok: str, session_id: str) -> None:
    """Print the session's events from the first until its turn completes."""
    ws_url = url.replace("http", "ws", 1).rstrip("/") + f"/api/v1/sessions/{session_id}/stream"
    headers = {"Authorization": f"Bearer {tok}"}
    async with connect(f"{ws_url}?after_seq=0", additional_headers=headers, max_size=None) as ws:
        async for raw in ws:
            event = json.loads(raw)
            line = render(event)
            if line:
                click.echo(line)
            if event.get("type") in ("turn_completed", "exited"):
                return


@click.group()
def jobs() -> None:
    """Batch jobs (see also ``ccgate run``)."""


@jobs.command("ls")
@click.option("--status", default=None)
@click.option("--tag", default=None)
@click.option("--repo", default=None)
@_URL
@_TOKEN
def list_jobs(
    status: str | None, tag: str | None, repo: str | None, url: str, tok: str | None
) -> None:
    """Your jobs, newest first."""
    params = {k: v for k, v in (("status", status), ("tag", tag), ("repository", repo)) if v}
    with client(url, tok) as http:
        page = answer(http.get("/jobs", params=params), 200)
    for job in page["jobs"]:
        position = f" #{job['queue_position']}" if job.get("queue_position") else ""
        click.echo(f"{job['id']}  {job['status']:<11}{position}  {job['prompt'][:60]}")


@jobs.command("show")
@click.argument("job_id")
@_URL
@_TOKEN
def show(job_id: str, url: str, tok: str | None) -> None:
    """One job, with its result."""
    with client(url, tok) as http:
        job = answer(http.get(f"/jobs/{job_id}"), 200)
    click.echo(describe(job))
    if job.get("result"):
        click.echo(job["result"])


@jobs.command("cancel")
@click.argument("job_id")
@_URL
@_TOKEN
def cancel(job_id: str, url: str, tok: str | None) -> None:
    """Cancel a job (a running one's container is stopped)."""
    with client(url, tok) as http:
        click.echo(describe(answer(http.post(f"/jobs/{job_id}/cancel"), 202)))


@jobs.command("files")
@click.argument("job_id")
@click.argument("path", default="")
@_URL
@_TOKEN
def files_cmd(job_id: str, path: str, url: str, tok: str | None) -> None:
    """List a directory of the job's workspace (PATH, default its root)."""
    with client(url, tok) as http:
        listing = answer(http.get(f"/jobs/{job_id}/files", params={"path": path}), 200)
    for entry in listing["entries"]:
        size = "" if entry["size"] is None else str(entry["size"])
        click.echo(f"{entry['kind']:<7} {size:>10}  {entry['name']}")


@jobs.command("get")
@click.argument("job_id")
@click.argument("path")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@_URL
@_TOKEN
def get_file(job_id: str, path: str, output: Path | None, url: str, tok: str | None) -> None:
    """Download one file of the job's workspace (to stdout, or -o FILE)."""
    with client(url, tok) as http:
        r = http.get(f"/jobs/{job_id}/files/{path}")
        if r.status_code != 200:
            answer(r, 200)
    if output is None:
        sys.stdout.buffer.write(r.content)
    else:
        output.write_bytes(r.content)


@jobs.command("rm")
@click.argument("job_id")
@_URL
@_TOKEN
def remove(job_id: str, url: str, tok: str | None) -> None:
    """Delete a finished job with its workspace."""
    with client(url, tok) as http:
        answer(http.delete(f"/jobs/{job_id}"), 204)
