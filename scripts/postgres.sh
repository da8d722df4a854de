#!/usr/bin/env bash
# A private PostgreSQL server (its own data directory, 127.0.0.1 only, its own port) for the
# PostgreSQL test run and the fleet benchmark. It needs root (the server runs as `postgres`).
#   scripts/postgres.sh start DIR PORT   initdb in DIR (new, empty), start, create role and database
#                                        `ctweb`; prints the DATABASE_URL
#   scripts/postgres.sh stop DIR         stop the server and remove DIR
set -euo pipefail
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$PGBIN" ] || { echo "postgres.sh: PostgreSQL is not installed (bash scripts/setup.sh postgresql)" >&2; exit 1; }
as_pg() { runuser -u postgres -- "$@"; }
case "${1:-}" in
  start)
    dir=$2 port=$3
    [[ "$port" =~ ^[0-9]+$ ]] || { echo "postgres.sh: bad port: $port" >&2; exit 2; }
    mkdir -p "$dir"
    chown postgres "$dir"
    as_pg "$PGBIN/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
    as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
      -o "-h 127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=200" start >/dev/null
    as_pg psql -h 127.0.0.1 -p "$port" -U postgres -q -c "CREATE ROLE ctweb LOGIN SUPERUSER" \
      -c "CREATE DATABASE ctweb OWNER ctweb"
    echo "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" >&2
    echo "postgres://ctweb@127.0.0.1:$port/ctweb"
    ;;
  stop)
    dir=$2
    as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
  *)
    echo "usage: $0 start DIR PORT | stop DIR" >&2
    exit 2
    ;;
esac
