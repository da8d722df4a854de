#!/usr/bin/env bash
# `make run`: the dashboard with its Redis and worker under one process runner.
set -euo pipefail
cd "$(dirname "$0")/.."
# honcho hands each process its own PORT, so ours has its own name.
CTWEB_PORT=${CTWEB_PORT:-${PORT:-8000}}
export CTWEB_PORT
. scripts/env.sh
.venv/bin/python manage.py ensure_admin
echo
echo "ctweb: open http://127.0.0.1:${CTWEB_PORT}/ and log in with the admin account above."
echo "ctweb: Ctrl-C stops everything."
echo
exec .venv/bin/honcho start -f Procfile
