#!/usr/bin/env bash
# `make test`: lint (ruff, and lint-imports for the import contracts in pyproject.toml), then the whole suite; non-zero on any failure.
# The lab tests bring the lab up themselves; whatever happens, it is down afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
# Every lab instance this can have made (the default one, and one per xdist worker: 1, 2, ...),
# but none another session still holds (its lock: another checkout's run on this machine).
down_all() {
  [ "$(id -u)" = 0 ] || return 0
  for id in "" 1 2 3 4 5 6 7 8 9; do
    flock -n "/run/lock/ctweb-lab$id.lock" env CTWEB_LAB_ID=$id .venv/bin/python -m lab down >/dev/null 2>&1 || true
  done
}
trap down_all EXIT
.venv/bin/ruff check .
.venv/bin/ruff format --check . >/dev/null || { echo "ruff format would change files: run make format"; exit 1; }
contracts=$(.venv/bin/lint-imports --no-logo --cache-dir var/import-linter 2>&1) || { echo "$contracts"; exit 1; }
if [ $# -eq 0 ]; then
  # Everything that needs neither root nor the lab, two at a time (`make test-fast`); then the
  # real stack and the lab, two test files at a time, each xdist worker with a stack and a lab
  # instance of its own (tests/conftest.py); then the tests whose dashboard needs the lab to
  # itself (several nodes on PostgreSQL: tests/nodes/test_e2e_lab_fleet.py), in a session of their own,
  # beside the btrfs snapshots on a lab whose lab-b is on btrfs.
  # One test run for the fault matrix's report (tests/support/faults.py): the rows of both lab
  # sessions go into one test-artifacts/fault-matrix.md.
  export CTWEB_TEST_RUN=${CTWEB_TEST_RUN:-$(date -u +%Y%m%d-%H%M%S)-$$}
  .venv/bin/python -m pytest -m "not e2e and not lab" -n 2
  .venv/bin/python -m pytest -m "(e2e or lab) and not lab_alone" -n 2 --dist loadfile --durations=60
  # These two sessions run side by side, each on a lab instance of its own (one worker each: two
  # cores). Native copy-on-write: a lab instance whose lab-b keeps containers on btrfs
  # (CTWEB_LAB_BTRFS, lab/core.py); in the sessions above that test skips (plain lab-b).
  alone_log=$(mktemp)
  .venv/bin/python -m pytest -m lab_alone >"$alone_log" 2>&1 &
  alone=$!
  rc=0
  CTWEB_LAB_ID=4 CTWEB_LAB_BTRFS=lab-b .venv/bin/python -m pytest tests/lab/test_snapshot_btrfs.py || rc=$?
  wait "$alone" || rc=$?
  cat "$alone_log"
  rm -f "$alone_log"
  # Each merged the run's fault rows as it ended; merged again once both have, so none is missing.
  .venv/bin/python -c "from tests.support import faults; faults.write_report()" || rc=$?
  exit "$rc"
else
  .venv/bin/python -m pytest "$@"
fi
