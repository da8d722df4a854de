#!/usr/bin/env bash
# `make test`: lint, then the whole suite; non-zero on any failure.
# The lab tests bring the lab up themselves; whatever happens, it is down afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
trap '[ "$(id -u)" = 0 ] && .venv/bin/python -m hosts.lab down >/dev/null 2>&1 || true' EXIT
.venv/bin/ruff check .
.venv/bin/ruff format --check . >/dev/null || { echo "ruff format would change files: run make format"; exit 1; }
.venv/bin/lint-imports --no-cache >/dev/null || { .venv/bin/lint-imports --no-cache; exit 1; }
.venv/bin/python -m pytest "$@"
