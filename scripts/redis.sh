#!/usr/bin/env bash
# The project's private Redis: a unix socket under var/, nothing on the network.
set -euo pipefail
cd "$(dirname "$0")/.."
VAR=${CTWEB_VAR_DIR:-$PWD/var}
mkdir -p "$VAR/redis"
exec redis-server --port 0 --unixsocket "$VAR/redis.sock" --unixsocketperm 700 \
  --dir "$VAR/redis" --appendonly yes --save "" --daemonize no --loglevel warning
