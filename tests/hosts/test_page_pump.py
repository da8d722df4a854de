"""The post-copy page pump's rounds, with stand-ins for the OpenSSH processes: which
connections and sessions it starts while one host does not answer. (The same against real
sshds: tests/hosts/test_relay.py.)"""

from contextlib import contextmanager
from types import SimpleNamespace

from hosts import ssh


class FakeLink:
    down: set = set()  # host names that do not answer
    made: list = []

    def __init__(self, host, who):
        self.host, self.who, self.ended = host, who, False
        FakeLink.made.append(host.name)

    def wait_ready(self, stop=None):
        if self.host.name in FakeLink.down:
            raise ssh.SSHError(f"Cannot connect to {self.host.name}: refused")

    def alive(self):
        return not self.ended and self.host.name not in FakeLink.down

    def kill(self):
        self.ended = True

    def close(self):
        self.ended = True


class FakeSession:
    started: list = []

    def __init__(self, host, path, sub, params, who, link=None):
        assert link is not None and link.host is host  # always a session on the host's link
        FakeSession.started.append(host.name)
        self.host, self.who = host, who

    def tail(self):
        return ""

    def kill(self):
        pass

    def close(self):
        pass


def _pump(monkeypatch, gated=False) -> ssh.PagePump:
    FakeLink.down, FakeLink.made, FakeSession.started = set(), [], []

    @contextmanager
    def connect(host, timeout=None):
        if host.name in FakeLink.down:
            raise ssh.SSHError(f"Cannot connect to {host.name}")
        yield SimpleNamespace(ensure_agent=lambda: "/var/lib/ctweb/agent/a.pyz")

    monkeypatch.setattr(ssh, "SSHLink", FakeLink)
    monkeypatch.setattr(ssh, "AgentProcess", FakeSession)
    monkeypatch.setattr(ssh, "connect", connect)
    # A round ends at once (each side's stream ended): the next one follows 0.1 s later.
    monkeypatch.setattr(ssh.PagePump, "_copy", lambda self, src, dst, counter: None)
    source, target = SimpleNamespace(name="lab-a"), SimpleNamespace(name="lab-b")
    return ssh.PagePump(source, target, {"name": "pc", "migration": 1}, gated=gated)


def test_rounds_reuse_one_connection_per_host(monkeypatch):
    pump = _pump(monkeypatch).start()
    try:
        pump._stop.wait(1.0)
    finally:
        pump.stop()
    assert pump.rounds >= 5
    assert FakeLink.made == ["lab-a", "lab-b"]  # one each, for every round
    assert FakeSession.started.count("lab-a") == pump.rounds == FakeSession.started.count("lab-b")


def test_a_host_that_does_not_answer_costs_the_other_nothing(monkeypatch):
    """While the target does not answer, no round starts and the source gets no new
    connection and no session; once it answers, the pull goes on over the same source link."""
    pump = _pump(monkeypatch).start()
    try:
        pump._stop.wait(0.5)
        FakeLink.down.add("lab-b")  # the target crashes
        pump._stop.wait(0.3)
        rounds, sessions, links = pump.rounds, list(FakeSession.started), FakeLink.made.count("lab-a")
        pump._stop.wait(1.0)  # some ten tries to reach lab-b
        assert FakeLink.made.count("lab-b") >= 3
        assert (pump.rounds, FakeSession.started, FakeLink.made.count("lab-a")) == (rounds, sessions, links)
        FakeLink.down.clear()  # it answers again
        pump._stop.wait(0.5)
        assert pump.rounds > rounds and FakeLink.made.count("lab-a") == 1
    finally:
        pump.stop()


def test_a_gated_pump_opens_its_links_but_starts_no_session_until_the_gate_opens(monkeypatch):
    """A post-copy's pump starts with the dump, the target's relay only with the restore: before
    the gate opens, no agent is started on either host (each round would fail on the target
    and take CPU from the dump, transfer and restore while the container is down)."""
    pump = _pump(monkeypatch, gated=True).start()
    try:
        pump._stop.wait(0.6)
        assert FakeLink.made == ["lab-a", "lab-b"]  # ready for the first round
        assert FakeSession.started == [] and pump.rounds == 0
        pump.open_gate()
        pump._stop.wait(0.5)
        assert pump.rounds >= 2 and FakeSession.started.count("lab-b") == pump.rounds
    finally:
        pump.stop()
    stopped = ssh.PagePump(SimpleNamespace(name="x"), SimpleNamespace(name="y"), {}, gated=True).start()
    stopped.stop()  # a pump whose gate never opened still stops at once
    assert not stopped._thread.is_alive()
