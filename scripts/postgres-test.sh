#!/usr/bin/env bash
# Runs the suite once more on a real PostgreSQL server that this script installs,
# starts privately (its own data directory and port on 127.0.0.1) and stops again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh postgresql
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
PGPORT=${CTWEB_PG_PORT:-55432}
PGDIR=$(mktemp -d /tmp/ctweb-pg.XXXXXX)
chown postgres "$PGDIR"
as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
  as_pg "$PGBIN/pg_ctl" -D "$PGDIR/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$PGDIR"
}
trap cleanup EXIT
as_pg "$PGBIN/initdb" -D "$PGDIR/data" -A trust -U postgres >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/log" -w \
  -o "-h 127.0.0.1 -p $PGPORT -k $PGDIR -c fsync=off -c max_connections=200" start >/dev/null
as_pg psql -h 127.0.0.1 -p "$PGPORT" -U postgres -q -c "CREATE ROLE ctweb LOGIN SUPERUSER" \
  -c "CREATE DATABASE ctweb OWNER ctweb"
echo "postgres-test: PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PGPORT"
DATABASE_URL="postgres://ctweb@127.0.0.1:$PGPORT/ctweb" bash scripts/test.sh "$@"
