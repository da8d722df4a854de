#!/usr/bin/env bash
# Installs everything ctweb needs on a fresh Debian machine; safe to run again.
# - Debian packages (only the missing ones; apt-get update at most once)
# - a project virtualenv in .venv with requirements.txt (re-run when it changes)
# - the database schema and static files, a SECRET_KEY file and the fleet's SSH key (scripts/env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(redis-server openssh-server openssh-client criu rsync iproute2 ca-certificates chromium nginx openssl postgresql btrfs-progs sudo)
# nginx and openssl: deploy/'s site and its test (which runs nginx as its own process, not the service).
# postgresql: the several-node test stack's private cluster (scripts/postgres.sh; tests/support/multinode.py).
# btrfs-progs: mkfs.btrfs for the btrfs tests (a loop image) and the lab's opt-in btrfs host
# (CTWEB_LAB_BTRFS, lab/core.py); the agent itself needs none of it on a host.
# sudo: visudo checks the shipped sudoers rules (deploy/sudoers.d/ctweb) in tests/hosts/test_sudo.py.
# The lab's own needs (debootstrap and friends) are listed beside its code.
if [ -f scripts/apt-lab.txt ]; then
  mapfile -t lab_pkgs < <(grep -v '^\s*#' scripts/apt-lab.txt | grep -v '^\s*$')
  APT_PACKAGES+=("${lab_pkgs[@]}")
fi
APT_PACKAGES+=("$@")

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: these Debian packages are missing and installing them needs root: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11 is needed" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY"
  "$PY" -m venv .venv 2>/dev/null || {
    apt-get install -y -q python3-venv >/dev/null && "$PY" -m venv .venv
  }
fi
want=$(sha256sum requirements.txt | cut -d' ' -f1)
have=$(cat .venv/.requirements.sha256 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  echo "setup: installing Python packages"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -r requirements.txt
  echo "$want" > .venv/.requirements.sha256
fi

# The terminal client: the `ctweb` command in .venv/bin, installed from this checkout (editable).
here=$(pwd -P)
if [ "$(cat .venv/.cli-installed 2>/dev/null)" != "$here" ] || [ ! -x .venv/bin/ctweb ]; then
  out=$(.venv/bin/pip install -q --no-deps --no-build-isolation -e . 2>&1) || { echo "$out" >&2; exit 1; }
  echo "$here" > .venv/.cli-installed
fi

. scripts/env.sh
.venv/bin/python manage.py migrate --noinput -v 0
.venv/bin/python manage.py collectstatic --noinput -v 0
# The fleet's SSH key (CTWEB_SSH_KEY, default var/ssh/id_ed25519): made here once, while no host
# exists; a node of a fleet gets a copy of the fleet's instead.
.venv/bin/python manage.py sshkey >/dev/null
