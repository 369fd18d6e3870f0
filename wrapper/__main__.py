"""Entry point of the session container: ``python -m wrapper``.

Reads WrapperConfig from the environment and, when the gateway put the session's spec there,
starts the Claude Code CLI at once (``wrapper.launch.launch_early``) — before the service's
imports (asyncio, redis-py: ~110 ms in the container), which then overlap the CLI's own start.
Only light modules are imported above that launch; ``wrapper.serve`` does the rest.
"""

from __future__ import annotations

import os

from wrapper.config import WrapperConfig
from wrapper.launch import launch_early


def main() -> None:
    """Console entry."""
    config = WrapperConfig.from_env()
    early = launch_early(
        dict(os.environ),
        claude_bin=config.claude_bin,
        workspace=config.workspace,
        marker_dir=config.marker_dir,
        uid=config.cli_uid,
        home=config.cli_home,
    )
    from wrapper import serve  # the service's imports run while the CLI starts

    serve.main(config, early)


if __name__ == "__main__":
    main()
