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


def test_a_freeze_too_short_to_see_is_caught_by_the_seizure_that_outlasts_it(agent, monkeypatch):
    """CRIU thaws the cgroup once it has seized every task (criu/seize.c): the FROZEN moment
    can pass between two reads. The init gaining a tracer stays for the whole dump. Here no
    freezer is there at all, and a real PTRACE_SEIZE of a real process is the only sign."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    init = subprocess.Popen(["sleep", "600"])
    try:
        monkeypatch.setattr(agent.cgroups, "_init_pid", lambda name: init.pid)
        watch = agent.downtime.FreezeWatch("c1")
        assert watch.path is None and watch.tracer == 0
        time.sleep(0.2)
        assert libc.ptrace(0x4206, init.pid, None, None) == 0, ctypes.get_errno()  # PTRACE_SEIZE, as CRIU does
        seized_at = time.monotonic()
        time.sleep(0.1)
        report = watch.report()
        assert report["how"] == "seized" and "why" not in report, report
        assert report["ago_ms"] <= (time.monotonic() - seized_at) * 1000 + 1  # from the seizure, not the start
        assert report["started_ago_ms"] >= report["ago_ms"] + 150
    finally:
        init.kill()
        init.wait()


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


# A process in a network namespace of its own holding one established TCP connection over
# its loopback; it sends new data when told (a line on its stdin) and says when it did.
NETNS_PEER = """
import socket, sys, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
print("up", flush=True)
for line in sys.stdin:
    c.sendall(b"x" * 100); s.recv(100)
    print(time.monotonic(), flush=True)
"""


def _netns_peer(connected=True):
    code = NETNS_PEER if connected else "import sys\nprint('up', flush=True)\nsys.stdin.read()"
    p = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec python3 -c "$0"', code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "up"
    return p


def _serving_watch(agent, monkeypatch, pid):
    _config(agent, "lxc.net.0.ipv4.address = 127.0.0.1/8\n")
    monkeypatch.setattr(agent.downtime, "_network", lambda: {"subnet": "127.0.0.0/8"})
    monkeypatch.setattr(agent.downtime, "_init_pid", lambda name: pid)
    return agent.downtime.AnswerWatch("c1")


@pytest.mark.skipif(os.geteuid() != 0, reason="a raw ICMP socket and a network namespace need root")
def test_served_is_the_first_new_tcp_data_its_processes_send_after_the_answer(agent, monkeypatch):
    # Post-copy: the address answers at once, its service only when its memory has come.
    peer = _netns_peer()
    try:
        watch = _serving_watch(agent, monkeypatch, peer.pid)
        time.sleep(0.4)  # answered long ago; no data yet
        peer.stdin.write("send\n")
        peer.stdin.flush()
        sent_at = float(peer.stdout.readline())
        time.sleep(0.2)
        report = watch.report()
        now = time.monotonic()
        assert report["ago_ms"] >= 500 and report["connections"] == 2  # both ends are in its namespace
        # Served when it sent, not when it answered ICMP (within the 2 ms poll and this test's reads).
        assert abs(report["served_ago_ms"] - (now - sent_at) * 1000) < 50, report
        assert report["served_wait_ms"] < 100  # it had sent before the restore's end: no wait
    finally:
        peer.kill()
        peer.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="a raw ICMP socket and a network namespace need root")
def test_idle_connections_end_the_wait_after_its_bound_and_say_so(agent, monkeypatch):
    peer = _netns_peer()
    try:
        watch = _serving_watch(agent, monkeypatch, peer.pid)
        report = watch.report()
        assert "served_ago_ms" not in report and report["address"] == "127.0.0.1"
        assert "sent no new data within 2 s" in report["served_why"]
        assert 1900 <= report["served_wait_ms"] <= 3000
    finally:
        peer.kill()
        peer.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="a raw ICMP socket and a network namespace need root")
def test_no_established_connection_means_no_wait_and_the_answer_stands(agent, monkeypatch):
    peer = _netns_peer(connected=False)
    try:
        report = _serving_watch(agent, monkeypatch, peer.pid).report()
        assert report["served_why"] == "it held no established TCP connection"
        assert report["served_wait_ms"] < 500
    finally:
        peer.kill()
        peer.wait()
