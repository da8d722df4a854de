"""Post-copy's direct page link on real sockets: two page relays (the agent's own code, each
in its own process as on a host) linked over TLS 1.3 on loopback, the test playing both CRIU
processes. The bytes arrive in order, none lost or doubled, also when the TCP connection is
cut mid-stream (the target's relay connects again and the relays resume from their offsets);
a connection with another certificate, or from another address, is refused and changes
nothing; the target gives the direct link up (for the dashboard's path) when it cannot be made."""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hosts.pagecerts import PageLinkKeys
from tests.support.agent_loader import PACKAGE_DIR, load_agent

AGENT_DIR = str(PACKAGE_DIR.parent)
RELAY = (
    "import os, sys; sys.path.insert(0, sys.argv[1]); from ctweb_agent import pagelink, lazy; "
    "os.dup2(int(sys.argv[3]), 3); os.close(int(sys.argv[3])); "
    "pagelink.SETUP_S = float(sys.argv[2]); lazy.cmd_pages_relay({})"
)


@pytest.fixture
def agent(tmp_path):
    return load_agent(root=tmp_path)


class Relay:
    """One host's page relay in its own process; `criu` is the test's end of CRIU's socket."""

    def __init__(self, tmp: Path, role: str, direct: dict | None, setup_s: float = 10):
        self.mdir = tmp / role
        self.mdir.mkdir(mode=0o700)
        self.role = role
        if direct is not None:
            agent = load_agent()
            agent.pagelink.install(str(self.mdir), role, agent.pagelink.check_params(direct, role))
        self.criu, theirs = socket.socketpair()
        env = dict(os.environ, CTWEB_RELAY=json.dumps({"dir": str(self.mdir), "role": role, "direct": bool(direct)}))
        fd = os.dup(theirs.fileno())
        theirs.close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RELAY, AGENT_DIR, str(setup_s), str(fd)],
            env=env,
            pass_fds=(fd,),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        os.close(fd)

    def status(self) -> dict:
        try:
            return json.loads((self.mdir / "page-relay-status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait(self, what, check, timeout=20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if check(s):
                return s
            assert self.proc.poll() is None, self.proc.communicate()
            time.sleep(0.02)
        raise AssertionError(f"{self.role}: no {what}: {self.status()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()
        self.criu.close()


class Cutter:
    """A TCP forwarder between the target's relay and the source's (both on 127.0.0.1):
    it closes the current connection's both sides abruptly, mid-stream, once it has forwarded
    each of `cut_at` bytes from the source."""

    def __init__(self, port: int, cut_at=()):
        self.port, self.cut_at, self.cuts = port, sorted(cut_at), []
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.listen_port = self.srv.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.connections = 0
        self.forwarded = 0
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop:
            try:
                a, _ = self.srv.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.port), source_address=("127.0.0.1", 0))
            self.conns = [a, b]
            self.connections += 1
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b):
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 0.5)
                for s in ready:
                    data = s.recv(1 << 16)
                    if not data:
                        raise OSError("closed")
                    (b if s is a else a).sendall(data)
                    if s is b:
                        self.forwarded += len(data)
                        if self.cut_at and self.forwarded >= self.cut_at[0]:
                            self.cuts.append(self.cut_at.pop(0))
                            raise OSError("cut")
        except (OSError, ValueError):
            for s in (a, b):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    s.close()
                except OSError:
                    pass

    def cut(self):
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.stop = True
        self.srv.close()
        self.cut()


def _pair(tmp_path, setup_s=10.0, via=None):
    """A source relay listening on 127.0.0.1, and a target relay connecting to it (or to `via`)."""
    keys = PageLinkKeys(7)
    source = Relay(tmp_path, "source", keys.for_source("127.0.0.1", "127.0.0.1"))
    port = source.wait("listening port", lambda s: (s.get("direct") or {}).get("port"))["direct"]["port"]
    target = None
    if via is not False:
        target_port = via(port) if via else port
        target = Relay(tmp_path, "target", keys.for_target("127.0.0.1", "127.0.0.1", target_port), setup_s)
    return keys, source, target, port


def _stream(source: Relay, target: Relay, size: int, during=None) -> tuple[str, str, bytes]:
    """The source's CRIU sends `size` random bytes, the target's CRIU sends a request line
    back; returns (sha256 sent, sha256 received, what the source's CRIU got)."""
    sent, got = hashlib.sha256(), hashlib.sha256()
    received = [0]

    def produce():
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            sent.update(chunk)
            source.criu.sendall(chunk)
            left -= len(chunk)

    writer = threading.Thread(target=produce, daemon=True)
    writer.start()
    target.criu.sendall(b"GET pages\n")
    target.criu.settimeout(60)
    while received[0] < size:
        data = target.criu.recv(1 << 20)
        assert data, f"the target's CRIU socket ended after {received[0]} bytes"
        got.update(data)
        received[0] += len(data)
        if during:
            during(received[0])
    writer.join(30)
    source.criu.settimeout(10)
    up = source.criu.recv(100)
    return sent.hexdigest(), got.hexdigest(), up


def test_pages_cross_over_tls_with_every_byte_in_order(tmp_path):
    keys, source, target, port = _pair(tmp_path)
    try:
        s_sent, s_got, up = _stream(source, target, 96 << 20)
        assert s_got == s_sent and up == b"GET pages\n"
        t = target.wait("counters", lambda s: s.get("from_peer") == 96 << 20)
        assert t["path"] == "direct-tls" and t["direct"]["state"] == "up" and t["direct"]["connects"] == 1, t
        assert source.status()["path"] == "direct-tls"
        # The files the relay reads: root only, in the root-only directory.
        for name in ("page-tls-own.key", "page-tls-own.pem", "page-tls-peer.pem", "page-tls.json"):
            assert (source.mdir / name).stat().st_mode & 0o777 == 0o600, name
        assert "PRIVATE KEY" not in (source.mdir / "page-tls.json").read_text()
    finally:
        source.stop()
        target.stop()


def test_a_cut_mid_stream_resumes_with_no_byte_lost_or_doubled(tmp_path):
    cutter: list[Cutter] = []

    def via(port):  # three cuts, at 20, 50 and 80 MiB through the connection
        cutter.append(Cutter(port, (20 << 20, 50 << 20, 80 << 20)))
        return cutter[0].listen_port

    keys, source, target, port = _pair(tmp_path, via=via)
    try:
        s_sent, s_got, up = _stream(source, target, 96 << 20)
        assert s_got == s_sent and up == b"GET pages\n"
        assert len(cutter[0].cuts) == 3 and cutter[0].connections == 4, (cutter[0].cuts, cutter[0].connections)
        t = target.wait("counters", lambda s: s.get("from_peer") == 96 << 20)
        assert t["direct"]["connects"] >= 4 and t["path"] == "direct-tls", t
    finally:
        cutter[0].close()
        source.stop()
        target.stop()


def _other_context(server: bool) -> ssl.SSLContext:
    """A TLS context with a certificate of the same shape that no relay pinned."""
    other = PageLinkKeys(7)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    d = Path(__import__("tempfile").mkdtemp())
    (d / "c.pem").write_text(other.source["cert"])
    (d / "k.pem").write_text(other.source["key"])
    ctx.load_cert_chain(d / "c.pem", d / "k.pem")
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


def test_a_connection_with_another_certificate_or_from_another_address_changes_nothing(tmp_path):
    keys, source, target, port = _pair(tmp_path)
    try:
        s_sent, s_got, _ = _stream(source, target, 8 << 20)
        assert s_got == s_sent
        before = source.wait("the link", lambda s: s.get("direct", {}).get("connects") == 1)
        # Someone on the allowed network with a certificate of their own: refused.
        raw = socket.create_connection(("127.0.0.1", port))
        raw.settimeout(5)
        try:  # TLS 1.3: the server's refusal comes after the client's own handshake ended
            s = _other_context(False).wrap_socket(raw)
            s.sendall(b"\x01" + b"\x00" * 12)  # a HELLO frame, if it got that far
            data = s.recv(100)
        except (ssl.SSLError, OSError):
            data = b""
        assert data == b""
        # The target's address is 127.0.0.1: a connection from 127.0.0.2 is closed at once.
        raw = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
        raw.settimeout(5)
        assert raw.recv(10) == b""
        raw.close()
        after = source.wait("the refusals", lambda s: s.get("direct", {}).get("refused") == 2)
        assert after["direct"]["connects"] == 1 and after["attaches"] == before["attaches"], after
        # The real link still carries the stream, from where it was.
        s_sent, s_got, _ = _stream(source, target, 8 << 20)
        assert s_got == s_sent
        target.wait("every byte", lambda s: s.get("from_peer") == 16 << 20)
    finally:
        source.stop()
        target.stop()


def test_the_target_refuses_a_source_with_another_certificate_and_gives_direct_up(tmp_path):
    fake = socket.create_server(("127.0.0.1", 0))
    ctx = _other_context(True)
    handshakes = []

    def serve():
        while True:
            try:
                conn, _ = fake.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True) as s:
                    s.settimeout(2)
                    handshakes.append(s.recv(100))
            except (OSError, ssl.SSLError) as e:
                handshakes.append(e)

    threading.Thread(target=serve, daemon=True).start()
    keys, source, target, port = _pair(tmp_path, setup_s=2, via=lambda port: fake.getsockname()[1])
    try:
        t = target.wait("giving direct up", lambda s: (s.get("direct") or {}).get("state") == "failed")
        assert t["path"] == "ssh-relay" and "certificate" in t["direct"]["error"], t
        assert handshakes and not any(isinstance(h, bytes) and h for h in handshakes), handshakes  # nothing sent
        # The dashboard's path takes over: an attach on each relay's socket, bridged here.
        a, b = (socket.socket(socket.AF_UNIX) for _ in range(2))
        a.connect(str(source.mdir / "page-relay.sock"))
        b.connect(str(target.mdir / "page-relay.sock"))
        stop = threading.Event()

        def bridge(x, y):
            while not stop.is_set():
                r, _, _ = select.select([x], [], [], 0.2)
                if r:
                    data = x.recv(1 << 20)
                    if not data:
                        return
                    y.sendall(data)

        for x, y in ((a, b), (b, a)):
            threading.Thread(target=bridge, args=(x, y), daemon=True).start()
        s_sent, s_got, up = _stream(source, target, 8 << 20)
        assert s_got == s_sent and up == b"GET pages\n"
        s = source.wait("the attach", lambda s: s.get("path") == "ssh-relay")
        assert s["direct"]["state"] == "failed" and "dashboard attached" in s["direct"]["error"], s
        stop.set()
    finally:
        fake.close()
        source.stop()
        target.stop()


def test_bad_direct_page_parameters_are_refused_before_anything(agent, tmp_path):
    keys = PageLinkKeys(3)
    good = keys.for_target("10.0.0.2", "10.0.0.1", 4000)
    assert agent.pagelink.check_params(good, "target")["port"] == 4000
    for bad in (
        {**good, "port": 0},
        {**good, "port": True},
        {**good, "address": "lab-a"},
        {**good, "bind": "10.0.0.2; rm -rf /"},
        {**good, "key": "not a key"},
        {**good, "peer_cert": keys.source["cert"] + keys.target["cert"]},
        {**good, "cert": "-----BEGIN CERTIFICATE-----\n" + "A" * 20000 + "\n-----END CERTIFICATE-----"},
        {**good, "peer_cert": "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----"},
        "a string",
    ):
        with pytest.raises(agent.AgentError):
            agent.pagelink.check_params(bad, "target")
    with pytest.raises(agent.AgentError):
        agent.pagelink.check_params({**keys.for_source("10.0.0.1", "10.0.0.2"), "peer": None}, "source")
    assert "PRIVATE KEY" not in repr(keys)
