#!/usr/bin/env bash
# `make test`: the whole suite; non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
