"""Post-copy's direct page path, as the worker runs it (fake hosts answering each agent call;
the real relays on sockets: tests/agent/test_agent_page_link.py; on the lab:
tests/migration/test_e2e_lab_postcopy_direct.py): where an admin allowed direct transfer,
each host's agent gets its own per-migration certificate and key and the other's certificate
in its parameters, the target's relay is told the source's port, no page crosses the worker
(dashboard_bytes), and a target that reports no direct link makes the worker start its pump,
the result saying why. The certificates: each pins the other, a third is refused."""

import json
import socket
import ssl
import threading
from contextlib import contextmanager

import pytest

from containers.migration.postcopy import DirectPages
from containers.migration.run import migrate
from containers.models import Container
from core.models import FleetSettings
from hosts import ssh
from hosts.models import Host
from hosts.pagecerts import PageLinkKeys
from operations.models import Operation
from operations.runner import OperationContext
from tests.support.agent_loader import load_agent

PAGES = 9 << 20


class Conn:
    def __init__(self, host, calls, restore_path):
        self.host, self.calls, self.restore_path = host, calls, restore_path

    def prestart_agent(self, sub):
        return ssh.Prestarted(sub, None)  # nothing waits: the call starts its own

    def run_agent(self, sub, params, on_event=None, timeout=None, prestarted=None):
        self.calls.append((self.host.name, sub, params))
        role = params.get("role")
        answer = {
            "migrate-prepare": {"state": "RUNNING", "need_bytes": 1},
            "migrate-dump": {"stats": {}, "pages_bytes": 0, "relay": 1, "direct_pages": {"port": 4242}},
            "migrate-restore": {"stats": {}, "page_path": self.restore_path, "page_path_why": "no direct link (x)"},
            "migrate-lazy-wait": {
                "done": True,
                "relay": {
                    "from_peer": PAGES if role == "target" else 4096,
                    "acked_by_peer": 4096 if role == "target" else PAGES,
                    "direct": {"connects": 1},
                },
            },
        }.get(sub, {})
        if sub == "migrate-restore" and on_event:
            on_event({"type": "event", "message": "page path", "page_path": self.restore_path})
        return ssh.AgentResult(answer, "", 0)

    def stream(self, sub, params, who):
        return Stream()

    def close(self):
        pass


class Stream:
    def begin(self, params):
        pass

    def close(self):
        pass


class Pump:
    started: list = []
    path = "ssh-relay"
    bytes_down, bytes_up, rounds, last_progress, errors = PAGES, 4096, 1, 0.0, []

    def __init__(self, *a, gated=False):
        self.gate_open = not gated

    def start(self):
        Pump.started.append(self)
        return self

    def open_gate(self):
        self.gate_open = True

    def stop(self):
        pass


@pytest.fixture
def run(db, trusted_host, monkeypatch):
    net = {"network": {"subnet": "10.0.0.0/24", "bridge": "br0"}}
    Host.objects.filter(pk=trusted_host.pk).update(capabilities=net)
    target = Host.objects.create(
        name="h2", address="127.0.0.2", port=1, status="online", key_data="x", capabilities=net
    )
    c = Container.objects.create(name="c1", host=trusted_host, state="RUNNING")
    fs = FleetSettings.load()
    fs.direct_transfer_networks = ["127.0.0.0/8"]
    fs.save()
    calls: list = []
    Pump.started = []

    def go(restore_path="direct-tls"):
        @contextmanager
        def connect(host, timeout=None):
            yield Conn(host, calls, restore_path)

        monkeypatch.setattr(ssh, "connect", connect)
        monkeypatch.setattr(ssh, "direct", lambda *a, **kw: (1000, {}))
        monkeypatch.setattr(ssh, "relay", lambda *a, **kw: (1000, {}))
        monkeypatch.setattr(ssh, "PagePump", Pump)
        op = Operation.objects.create(
            kind="migrate",
            status="running",
            container=c,
            container_name="c1",
            host=Host.objects.get(pk=trusted_host.pk),
            target_host=target,
            params={"strategy": "post-copy", "why": "asked for"},
        )
        return migrate(OperationContext(op)), op

    go.calls = calls
    return go


def _params(calls, host, sub):
    return next(p for h, s, p in calls if h == host and s == sub)


def test_the_pages_go_host_to_host_and_none_cross_the_worker(run):
    result, op = run()
    dump, restore = _params(run.calls, "h1", "migrate-dump"), _params(run.calls, "h2", "migrate-restore")
    src, dst = dump["direct_pages"], restore["direct_pages"]
    assert (src["listen"], src["peer"]) == ("127.0.0.1", "127.0.0.2")
    assert (dst["bind"], dst["address"], dst["port"]) == ("127.0.0.2", "127.0.0.1", 4242)
    assert src["peer_cert"] == dst["cert"] and dst["peer_cert"] == src["cert"] and src["cert"] != dst["cert"]
    assert "PRIVATE KEY" in src["key"] and src["key"] != dst["key"]
    assert not Pump.started  # no pump: nothing of the pages through this worker
    assert result["transfer"]["pages"] == "direct-tls" and result["transfer"]["pages_encrypted"] is True
    assert result["page_relay"]["path"] == "direct-tls" and result["page_relay"]["encrypted"] is True
    assert result["page_bytes"] == PAGES and result["page_relay"]["bytes_up"] == 4096
    assert result["dashboard_bytes"] == 0  # the tars went direct too
    assert "over TLS 1.3" in result["transport"]
    op.refresh_from_db()
    assert "PRIVATE KEY" not in json.dumps([op.events, op.result, op.params])  # the keys are never recorded


def test_a_target_without_a_direct_link_gets_the_pages_through_the_worker(run):
    result, op = run(restore_path="ssh-relay")
    assert len(Pump.started) == 1  # started once, as soon as the target said so
    assert Pump.started[0].gate_open  # and let go at once: its target relay is up
    assert result["transfer"]["pages"] == "ssh-relay" and result["transfer"]["pages_encrypted"] is True
    assert "no direct link (x)" in result["transfer"]["pages_why"]
    assert result["page_relay"]["path"] == "ssh-relay"
    assert result["dashboard_bytes"] == PAGES + 4096
    assert "the direct page link could not be made" in result["transport"]


def test_without_direct_transfer_the_agents_get_no_keys(run):
    fs = FleetSettings.load()
    fs.direct_transfer_networks = []
    fs.save()
    result, op = run()
    assert "direct_pages" not in _params(run.calls, "h1", "migrate-dump")
    assert "direct_pages" not in _params(run.calls, "h2", "migrate-restore")
    assert len(Pump.started) == 1 and result["page_relay"]["path"] == "ssh-relay"
    assert Pump.started[0].gate_open  # started gated with the dump, opened by the restore


def test_direct_pages_counts_what_the_relays_report():
    d = DirectPages()
    d.observe("target", {"from_peer": 5, "acked_by_peer": 1, "direct": {"connects": 2, "error": "cut"}})
    d.observe("source", {"from_peer": 2, "acked_by_peer": 7})
    d.observe("target", {"from_peer": "lies"})
    assert (d.bytes_down, d.bytes_up, d.rounds) == (7, 2, 2) and d.errors[-1].endswith("target: cut")


def _handshake(server_keys: dict, client_keys: dict, tmp_path) -> str:
    """A TLS handshake between the agent's own contexts for the two sides; '' or the error."""
    agent = load_agent()
    dirs = {}
    for role, keys in (("source", server_keys), ("target", client_keys)):
        d = tmp_path / role
        d.mkdir(parents=True)
        agent.pagelink.install(str(d), role, keys)
        dirs[role] = d
    server_ctx = agent.pagelink.context(str(dirs["source"]), server=True)
    client_ctx = agent.pagelink.context(str(dirs["target"]), server=False)
    a, b = socket.socketpair()
    errors = []

    def serve():
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as e:
            errors.append(f"server: {e}")

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b) as s:
            s.sendall(b"x")
            s.recv(1)
    except (ssl.SSLError, OSError) as e:
        errors.append(f"client: {e}")
    t.join(10)
    return "; ".join(errors)


def test_each_side_trusts_exactly_the_other_certificate(tmp_path):
    keys, other = PageLinkKeys(1), PageLinkKeys(1)
    src = keys.for_source("127.0.0.1", "127.0.0.2")
    dst = keys.for_target("127.0.0.2", "127.0.0.1", 1)
    agent = load_agent()
    check = agent.pagelink.check_params
    assert _handshake(check(src, "source"), check(dst, "target"), tmp_path / "good") == ""
    # The target presenting another migration's certificate: the source refuses it.
    forged = {**dst, "cert": other.target["cert"], "key": other.target["key"]}
    assert "certificate" in _handshake(check(src, "source"), check(forged, "target"), tmp_path / "t").lower()
    # A source presenting another certificate: the target refuses it.
    forged = {**src, "cert": other.source["cert"], "key": other.source["key"]}
    assert "certificate verify failed" in _handshake(check(forged, "source"), check(dst, "target"), tmp_path / "s")
