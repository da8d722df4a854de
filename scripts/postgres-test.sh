#!/usr/bin/env bash
# Runs the suite once more on a real PostgreSQL server that this script installs,
# starts privately (scripts/postgres.sh: its own data directory and port on 127.0.0.1) and stops again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh postgresql
PGPORT=${CTWEB_PG_PORT:-55432}
PGDIR=$(mktemp -d /tmp/ctweb-pg.XXXXXX)
trap 'bash scripts/postgres.sh stop "$PGDIR"' EXIT
url=$(bash scripts/postgres.sh start "$PGDIR" "$PGPORT")
echo "postgres-test: $url"
DATABASE_URL="$url" bash scripts/test.sh "$@"
