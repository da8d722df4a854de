"""The agent's two instants of a migration's client-visible downtime (hosts/agent
downtime.py), on this machine's own kernel: a real freezer cgroup frozen under a real process,
real ICMP echo to a real address. Only "which pid is the init" and the container's config
are given. Needs root (a cgroup, a raw socket); the lab test
tests/migration/test_e2e_lab_client_downtime.py runs them inside real migrations."""

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.support.agent_loader import load_agent

FREEZER = Path("/sys/fs/cgroup/freezer")


@pytest.fixture
def agent(tmp_path):
    a = load_agent(root=tmp_path)
    (tmp_path / "lxc" / "c1").mkdir(parents=True)
    return a


def _config(agent, text):
    Path(agent.S.LXC_PATH, "c1", "config").write_text(text)


@pytest.mark.skipif(os.geteuid() != 0 or not FREEZER.is_dir(), reason="needs root and a v1 freezer hierarchy")
def test_the_freeze_is_the_moment_the_containers_freezer_cgroup_leaves_thawed(agent, monkeypatch):
    top = FREEZER / f"ctweb-test-{uuid.uuid4().hex[:8]}"
    group = top / "lxc.payload.c1"  # the container's cgroup as LXC names it
    group.mkdir(parents=True)
    init = subprocess.Popen(["sleep", "600"])
    try:
        (group / "cgroup.procs").write_text(str(init.pid))
        monkeypatch.setattr(agent.cgroups, "_init_pid", lambda name: init.pid)
        watch = agent.downtime.FreezeWatch("c1")
        assert watch.path == str(group / "freezer.state")
        time.sleep(0.2)
        (group / "freezer.state").write_text("FROZEN")  # what CRIU does first in a dump
        froze_at = time.monotonic()
        time.sleep(0.3)
        report = watch.report()
        assert report["how"] == "freezer"
        # It counts from the freeze, not from the watch's start 0.2 s earlier.
        assert report["ago_ms"] <= (time.monotonic() - froze_at) * 1000 + 1
        (group / "freezer.state").write_text("THAWED")
    finally:
        init.kill()
        init.wait()
        for _ in range(50):
            try:
                for d in (group, top):
                    if d.exists():
                        d.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def test_without_a_freezer_file_it_counts_from_the_dumps_start_and_says_so(agent, monkeypatch):
    monkeypatch.setattr(agent.cgroups, "_init_pid", lambda name: None)
    watch = agent.downtime.FreezeWatch("c1")
    time.sleep(0.05)
    report = watch.report()
    assert report["how"] == "dump-start" and report["ago_ms"] >= 50


@pytest.mark.skipif(os.geteuid() != 0, reason="a raw ICMP socket needs root")
def test_the_answer_is_the_first_echo_reply_from_the_containers_address(agent, monkeypatch):
    _config(agent, "lxc.net.0.ipv4.address = 127.0.0.1/8\n")
    monkeypatch.setattr(agent.downtime, "_network", lambda: {"subnet": "127.0.0.0/8"})
    watch = agent.downtime.AnswerWatch("c1")
    time.sleep(0.2)
    report = watch.report()
    assert report["address"] == "127.0.0.1" and report["ago_ms"] >= 150  # it answered at once, 0.2 s ago


def test_no_address_gives_a_reason_not_a_number(agent):
    _config(agent, "lxc.net.0.type = empty\n")
    assert agent.downtime.AnswerWatch("c1").report() == {"ago_ms": None, "why": "it has no IPv4 address in its config"}


def test_an_address_outside_the_hosts_container_network_is_never_pinged(agent, monkeypatch):
    # A config that came from another host names an address this host does not serve.
    _config(agent, "lxc.net.0.ipv4.address = 127.0.0.1/8\n")
    monkeypatch.setattr(agent.downtime, "_network", lambda: {"subnet": "10.77.64.0/24"})
    watch = agent.downtime.AnswerWatch("c1")
    assert watch._thread is None
    assert "not in this host's container network" in watch.report()["why"]
    monkeypatch.setattr(agent.downtime, "_network", lambda: None)
    assert agent.downtime.AnswerWatch("c1")._thread is None
