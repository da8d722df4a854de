#!/usr/bin/env bash
# `make test`: lint (ruff, and lint-imports for the import contracts in pyproject.toml), then the whole suite; non-zero on any failure.
# The lab tests bring the lab up themselves; whatever happens, it is down afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
trap '[ "$(id -u)" = 0 ] && .venv/bin/python -m lab down >/dev/null 2>&1 || true' EXIT
.venv/bin/ruff check .
.venv/bin/ruff format --check . >/dev/null || { echo "ruff format would change files: run make format"; exit 1; }
contracts=$(.venv/bin/lint-imports --no-logo --cache-dir var/import-linter 2>&1) || { echo "$contracts"; exit 1; }
if [ $# -eq 0 ]; then
  # Everything that needs neither root nor the lab, two at a time (`make test-fast`); then the
  # real stack and the lab, one test at a time (one lab per machine).
  .venv/bin/python -m pytest -m "not e2e and not lab" -n 2
  .venv/bin/python -m pytest -m "e2e or lab"
else
  .venv/bin/python -m pytest "$@"
fi
