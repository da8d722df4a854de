"""A start watches the container's init until it settles or exits (hosts/agent lxc.py
_init_comes_up), never for a fixed time. Real processes stand in for the init here (only
LXC's "which pid is the init" is given); the lab test
tests/containers/test_e2e_lab_containers.py starts real containers whose init exits."""

import subprocess
import sys

from tests.support.agent_loader import load_agent

# Far longer than any run of this module: a watch that waited for its bound instead of an
# event would show as a hung test, not as a pass.
NO_BOUND = 600


def _watch(monkeypatch, proc, limit=NO_BOUND):
    agent = load_agent()
    monkeypatch.setattr(agent.lxc, "_init_pid", lambda name: proc.pid)
    return agent.lxc._init_comes_up("c1", limit)


def test_an_init_that_exits_at_once_is_reported_as_exited(monkeypatch):
    init = subprocess.Popen(["sh", "-c", "echo bye; exit 3"], stdout=subprocess.DEVNULL)
    try:
        assert _watch(monkeypatch, init) is False
    finally:
        init.wait()


def test_an_init_whose_program_is_missing_is_reported_as_exited(monkeypatch):
    init = subprocess.Popen(["sh", "-c", "exec /nonexistent/program"], stderr=subprocess.DEVNULL)
    try:
        assert _watch(monkeypatch, init) is False
    finally:
        init.wait()


def test_an_init_that_waits_in_its_own_program_is_up(monkeypatch):
    init = subprocess.Popen(["sh", "-c", "exec sleep 600"])
    try:
        assert _watch(monkeypatch, init) is True
        assert init.poll() is None
    finally:
        init.kill()
        init.wait()


def test_an_init_still_in_its_parents_program_is_not_taken_for_settled(monkeypatch):
    # Before its exec, LXC's child runs lxc-start's code and waits on a socket (state S):
    # sleeping is not enough, the init must run a program of its own. Here the "init"
    # sleeps in the same program as its parent (this Python), so only the bound ends the watch.
    init = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    agent = load_agent()
    try:
        monkeypatch.setattr(agent.lxc, "_init_pid", lambda name: init.pid)
        assert agent.lxc._init_settled(init.pid) is False
        assert agent.lxc._init_comes_up("c1", 0.2) is True  # alive at the bound: taken as running
    finally:
        init.kill()
        init.wait()


def test_a_container_without_an_init_pid_did_not_come_up(monkeypatch):
    agent = load_agent()
    monkeypatch.setattr(agent.lxc, "_init_pid", lambda name: None)
    assert agent.lxc._init_comes_up("c1") is False
