#!/usr/bin/env bash
# `make run`: the dashboard with its Redis and worker under one process runner.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8000}
export PORT
.venv/bin/python manage.py ensure_admin
echo
echo "ctweb: open http://127.0.0.1:${PORT}/ and log in with the admin account above."
echo "ctweb: Ctrl-C stops everything."
echo
exec .venv/bin/honcho start -f Procfile
