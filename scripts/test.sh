#!/usr/bin/env bash
# Run the whole test suite (unit, integration against real Redis/PostgreSQL/S3, end to end with
# real Docker and the real Claude Code CLI), after lint and type checks. Extra arguments go to
# pytest, e.g. `bash scripts/test.sh tests/unit -k auth`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
# The suite runs one session under gVisor (tests/e2e/test_gvisor.py): ask setup for runsc.
CCGATE_SETUP_GVISOR=1 bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest "${@:-tests}"
