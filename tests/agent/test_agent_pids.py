"""A watched process (CRIU's lazy-pages daemon, a page relay) is named by its pid AND its
start time: after its host restarted (a crash), a new process with the same pid is never
taken for it, never signalled by a cleanup (migrate-abort after a crash mid-pull)."""

import json
import os
import subprocess
import sys
import time

from tests.support.agent_loader import load_agent


def _agent():
    return load_agent()


def _starttime(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[-1].split()[19])


def test_a_recorded_pid_that_now_names_another_process_is_neither_waited_for_nor_killed(tmp_path):
    agent = _agent()
    # A process that happens to hold the pid the crashed host's daemon and watcher had.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = _starttime(other.pid) - 1  # the process that had this pid started earlier
        info = {"pid": other.pid, "watcher": other.pid, "pid_start": stale, "watcher_start": stale}
        (tmp_path / "lazy-pages.json").write_text(json.dumps(info))
        assert agent._watched_rc(str(tmp_path), "lazy-pages") == -1  # its watcher is gone: it ended
        assert agent._kill_watched(str(tmp_path), "lazy-pages", 9) is False
        assert other.poll() is None  # the unrelated process was left alone
        # The same records naming the live process rightly: it runs, and may be stopped.
        start = _starttime(other.pid)
        info.update(pid_start=start, watcher_start=start)
        (tmp_path / "lazy-pages.json").write_text(json.dumps(info))
        assert agent._watched_rc(str(tmp_path), "lazy-pages") is None
        assert agent._kill_watched(str(tmp_path), "lazy-pages", 9) is True
        assert other.wait(10) == -9
    finally:
        if other.poll() is None:
            os.kill(other.pid, 9)
            other.wait()


def _as(argv0: str, *args: str) -> subprocess.Popen:
    """A process whose command line reads `argv0 args…` (a stand-in for CRIU or LXC)."""
    script = 'exec -a "$0" "$1" -c "import time; time.sleep(60)" "${@:2}"'
    return subprocess.Popen(["bash", "-c", script, argv0, sys.executable, *args])


def test_an_abort_ends_only_its_own_migrations_restore(tmp_path):
    """A post-copy's restore cut off with its worker waits for pages forever, and LXC cannot
    even say how the container is (lxc-ls hung on the lab's lab-b after the full matrix's
    [post-copy-worker-restore]): migrate-abort ends that restore (its criu and lxc-checkpoint,
    named by the migration's images directory) and nothing else."""
    agent = _agent()
    mine, other = str(tmp_path / "58" / "images"), str(tmp_path / "59" / "images")
    procs = {
        "criu": _as("/usr/sbin/criu", "restore", "-D", mine),
        "lxc": _as("lxc-checkpoint", "-n", "c1", "-D", mine, "-r"),
        "other": _as("/usr/sbin/criu", "restore", "-D", other),
        "dump": _as("/usr/sbin/criu", "dump", "-D", mine),  # not a restore
    }
    try:
        deadline = time.monotonic() + 10
        while len(agent._restoring(mine)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # bash has exec'd
        assert sorted(agent._restoring(mine)) == sorted([procs["criu"].pid, procs["lxc"].pid])
        assert agent._end_restore(mine) is True
        assert procs["criu"].wait(10) == -9 and procs["lxc"].wait(10) == -9
        assert procs["other"].poll() is None and procs["dump"].poll() is None
        assert agent._end_restore(mine) is False  # nothing left of it
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
