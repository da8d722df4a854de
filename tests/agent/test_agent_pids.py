"""A watched process (CRIU's lazy-pages daemon, a page relay) is named by its pid AND its
start time: after its host restarted (a crash), a new process with the same pid is never
taken for it, never signalled by a cleanup (migrate-abort after a crash mid-pull)."""

import json
import os
import subprocess
import sys

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
