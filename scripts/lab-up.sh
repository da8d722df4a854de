#!/usr/bin/env bash
# `make run`'s lab: brings the local lab up with demo containers where the machine
# allows it, says why not otherwise, then stays in the foreground for honcho.
cd "$(dirname "$0")/.."
if .venv/bin/python manage.py lab up --demo; then
  echo "lab: up. It keeps running after Ctrl-C; '.venv/bin/python manage.py lab down' removes it."
else
  echo "lab: not started (see above); the dashboard runs without it."
fi
exec sleep infinity
