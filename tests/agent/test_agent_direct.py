"""The agent's direct host-to-host transfer, with real sockets on loopback and real files:
over TLS with the transfer's own certificates (as the dashboard always asks), only the peer
presenting its certificate feeds a receiver; inside, only the peer with the token (the tests
without TLS check that layer alone); every check of a relayed tar still holds, and both ends
stop when the dashboard lets go or the other side stalls."""

import hashlib
import hmac
import os
import secrets
import socket
import ssl
import struct
import sys
import threading
from pathlib import Path

import pytest

from hosts.pagecerts import PageLinkKeys
from tests.support.agent import make_tar
from tests.support.agent_loader import load_agent


def hello(token: str) -> bytes:
    """The connection's first line: derived from the token, which never crosses the network."""
    return (hmac.new(bytes.fromhex(token), b"ctweb-direct-hello", hashlib.sha256).hexdigest() + "\n").encode()


def signed(token: str, stream: bytes) -> bytes:
    """The stream as the source's agent sends it: the bytes, then their HMAC-SHA256 trailer."""
    key = hmac.new(bytes.fromhex(token), b"ctweb-direct-mac", hashlib.sha256).digest()
    return stream + hmac.new(key, stream, hashlib.sha256).digest()


def load(root: Path, events: list):
    agent = load_agent(root=root)
    agent.common.emit = lambda msg: events.append(msg) if msg.get("type") == "event" else None
    return agent


@pytest.fixture
def dashboard(monkeypatch):
    """Standard input as sshd gives it: a pipe the dashboard holds open (closing it = going away)."""
    r, w = os.pipe()

    class Stdin:
        buffer = os.fdopen(r, "rb")

    monkeypatch.setattr(sys, "stdin", Stdin)
    state = {"w": w}

    def leave():
        if state["w"] is not None:
            os.close(state["w"])
            state["w"] = None

    yield leave
    leave()
    Stdin.buffer.close()


@pytest.fixture
def pair(tmp_path, monkeypatch, dashboard):
    events: list = []
    src = load(tmp_path / "src", events)
    dst = load(tmp_path / "dst", events)
    cdir = Path(src.S.LXC_PATH) / "c1"
    (cdir / "rootfs" / "etc").mkdir(parents=True)
    (cdir / "config").write_text(f"lxc.rootfs.path = dir:{cdir}/rootfs\nlxc.hook.pre-start = /bin/evil\n")
    (cdir / "rootfs" / "etc" / "hostname").write_text("c1\n")
    (cdir / "rootfs" / "big").write_bytes(os.urandom(3 << 20))
    (cdir / "rootfs" / "evil").symlink_to(tmp_path)  # never followed by the sender
    (tmp_path / "host-secret").write_text("host only")
    os.makedirs(os.path.join(src.S.MIGRATIONS_PATH, "1"))  # made by migrate-prepare
    return src, dst, events


class Receiver(threading.Thread):
    def __init__(self, agent, events, params):
        super().__init__(daemon=True)
        self.agent, self.events, self.params = agent, events, params
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.agent.cmd_receive(self.params)
        except Exception as e:  # noqa: BLE001
            self.error = e

    def port(self) -> int:
        for _ in range(500):
            for e in self.events:
                if "listening" in e:
                    return e["listening"]
            if not self.is_alive():
                raise AssertionError(f"the receiver ended: {self.error}")
            threading.Event().wait(0.01)
        raise AssertionError("the receiver never listened")


def receiver(dst, events, token, peer="127.0.0.1", stall=5, tls=None):
    params = {
        "name": "c1",
        "migration": 1,
        "what": "rootfs",
        "stall_s": stall,
        "direct": {"listen": "127.0.0.1", "peer": peer, "token": token, "tls": tls},
    }
    r = Receiver(dst, events, params)
    r.start()
    return r, r.port()


def send_params(token, port, bind="127.0.0.1", tls=None):
    return {
        "name": "c1",
        "migration": 1,
        "what": "rootfs",
        "stall_s": 5,
        "direct": {"bind": bind, "address": "127.0.0.1", "port": port, "token": token, "tls": tls},
    }


def test_a_rootfs_goes_over_tls_with_this_transfers_certificates(pair):
    """As the dashboard sends them: TLS 1.3, each end pinning the other's certificate, the
    token's hello and MAC inside."""
    src, dst, events = pair
    token, keys = secrets.token_hex(32), PageLinkKeys(1)
    r, port = receiver(dst, events, token, tls=keys.tls("target"))
    sent = src.cmd_send(send_params(token, port, tls=keys.tls("source")))
    r.join(10)
    assert r.error is None, r.error
    got = Path(dst.S.LXC_PATH) / "c1" / "rootfs" / "big"
    assert got.read_bytes() == (Path(src.S.LXC_PATH) / "c1" / "rootfs" / "big").read_bytes()
    assert sent["bytes"] == r.result["bytes"] > 3 << 20 and sent["sha256"] == r.result["sha256"]


def test_without_this_transfers_certificate_nothing_is_unpacked(pair):
    """A sender with the token but another certificate, or none (plain TCP), is refused by a
    TLS receiver; a receiver with another certificate gets nothing from the sender."""
    src, dst, events = pair
    token, keys, other = secrets.token_hex(32), PageLinkKeys(1), PageLinkKeys(1)
    r, port = receiver(dst, events, token, tls=keys.tls("target"))
    with pytest.raises(src.AgentError):
        src.cmd_send(send_params(token, port, tls=other.tls("source")))
    r.join(10)
    assert isinstance(r.error, dst.AgentError) and "certificate" in r.error.message, r.error
    events.clear()
    r, port = receiver(dst, events, token, tls=keys.tls("target"))
    with socket.create_connection(("127.0.0.1", port)) as s:
        try:
            s.sendall(hello(token) + signed(token, make_tar([("c1", "dir", None), ("c1/rootfs", "dir", None)])))
        except OSError:
            pass
    r.join(10)
    assert isinstance(r.error, dst.AgentError) and "certificate" in r.error.message, r.error
    assert not (Path(dst.S.LXC_PATH) / "c1").exists()
    with socket.create_server(("127.0.0.1", 0)) as impostor:  # a receiver with another certificate
        ctx = dst.pagelink.stream_context(dst.pagelink.check_tls(other.tls("target")), server=True)
        seen = []

        def serve():
            conn, _ = impostor.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as s:
                    seen.append(s.recv(100))
            except (OSError, ssl.SSLError) as e:
                seen.append(e)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with pytest.raises(src.AgentError, match="certificate"):
            src.cmd_send(send_params(token, impostor.getsockname()[1], tls=keys.tls("source")))
        t.join(10)
    assert seen and not isinstance(seen[0], bytes), seen  # not even the hello reached it


def test_a_rootfs_goes_directly_with_every_check_of_a_relayed_one(pair):
    src, dst, events = pair
    token = secrets.token_hex(32)
    r, port = receiver(dst, events, token)
    sent = src.cmd_send(send_params(token, port))
    r.join(10)
    assert r.error is None, r.error
    got = Path(dst.S.LXC_PATH) / "c1"
    assert (got / "rootfs" / "big").read_bytes() == (Path(src.S.LXC_PATH) / "c1" / "rootfs" / "big").read_bytes()
    assert (got / "rootfs" / "etc" / "hostname").read_text() == "c1\n"
    assert os.path.islink(got / "rootfs" / "evil")  # the link itself travelled, not what it points to
    assert not any(b"host only" in p.read_bytes() for p in got.rglob("*") if p.is_file() and not p.is_symlink())
    config = (got / "config").read_text()
    assert "lxc.hook" not in config and f"dir:{got}/rootfs" in config  # hooks stripped, rootfs ours
    assert sent["bytes"] == r.result["bytes"] > 3 << 20
    assert sent["sha256"] == r.result["sha256"]  # the dashboard compares them over SSH
    assert any(e.get("bytes") for e in events if "listening" not in e)  # progress as it goes


def test_a_wrong_token_is_refused_and_nothing_is_unpacked(pair):
    src, dst, events = pair
    r, port = receiver(dst, events, secrets.token_hex(32))
    try:
        src.cmd_send(send_params(secrets.token_hex(32), port))
    except src.AgentError:
        pass  # the receiver may hang up before the sender has written everything
    r.join(10)
    assert isinstance(r.error, dst.AgentError) and "token" in r.error.message
    assert not (Path(dst.S.LXC_PATH) / "c1" / "rootfs").exists()


def test_only_the_source_host_may_connect(pair):
    src, dst, events = pair
    token = secrets.token_hex(32)
    r, port = receiver(dst, events, token, peer="127.0.0.2")
    with socket.create_connection(("127.0.0.1", port)) as stranger:  # the right port, the wrong host
        stranger.sendall(hello(token))
        try:
            assert stranger.recv(10) == b""  # hung up on
        except ConnectionResetError:
            pass  # or hung up on before it read what came
    src.cmd_send(send_params(token, port, bind="127.0.0.2"))
    r.join(10)
    assert r.error is None, r.error
    assert any("ignored a connection from 127.0.0.1" in e["message"] for e in events)


def test_a_malicious_tar_is_refused_directly_too(pair, tmp_path):
    _, dst, events = pair
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = make_tar(
        [
            ("c1", "dir", None),
            ("c1/rootfs", "dir", None),
            ("c1/rootfs/x", "symlink", str(outside)),
            ("c1/rootfs/x/pwned", "file", b"root on the target"),
        ]
    )
    token = secrets.token_hex(32)
    r, port = receiver(dst, events, token)
    with socket.create_connection(("127.0.0.1", port)) as s:
        try:
            s.sendall(hello(token) + signed(token, evil))  # authentic: refused for what it holds
        except OSError:
            pass
    r.join(10)
    assert isinstance(r.error, dst.AgentError) and "outside" in r.error.message
    assert not (outside / "pwned").exists()


def test_the_receiver_stops_when_the_dashboard_lets_go(pair, dashboard):
    _, dst, events = pair
    r, port = receiver(dst, events, secrets.token_hex(32), stall=30)
    dashboard()  # the worker closed its channel (cancel, failure, or it died)
    r.join(10)
    assert not r.is_alive()
    assert isinstance(r.error, dst.AgentError) and "dashboard ended the transfer" in r.error.message


def test_the_receiver_hashes_exactly_what_came(pair):
    _, dst, events = pair
    tar = make_tar([("c1", "dir", None), ("c1/config", "file", b"lxc.uts.name = c1\n"), ("c1/rootfs", "dir", None)])
    token = secrets.token_hex(32)
    r, port = receiver(dst, events, token)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(hello(token) + signed(token, tar))
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""  # it read to our end, then hung up
    r.join(10)
    assert r.error is None, r.error
    wire = signed(token, tar)
    key = hmac.new(bytes.fromhex(token), b"ctweb-direct-mac", hashlib.sha256).digest()
    # the digest the dashboard compares with the sender's: the stream's HMAC-SHA256
    assert r.result["bytes"] == len(wire) and r.result["sha256"] == hmac.new(key, tar, hashlib.sha256).hexdigest()
    assert (Path(dst.S.LXC_PATH) / "c1" / "config").is_file()


def test_a_sender_that_goes_silent_is_given_up(pair):
    _, dst, events = pair
    token = secrets.token_hex(32)
    r, port = receiver(dst, events, token, stall=1)
    partial = make_tar([("c1", "dir", None), ("c1/big", "file", b"x" * 100000)])[:5000]
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(hello(token) + partial)
        r.join(10)  # the link "died": nothing more comes and nothing says it ended
    assert isinstance(r.error, dst.AgentError) and "Nothing arrived for 1 s" in r.error.message


def test_a_sender_stops_when_the_dashboard_lets_go(pair, dashboard):
    src, _, _ = pair
    with socket.socket() as silent:  # a receiver that takes the connection and never reads
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        out = {}

        def run():
            try:
                src.cmd_send(send_params(secrets.token_hex(32), port))
            except Exception as e:  # noqa: BLE001
                out["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        conn, _ = silent.accept()
        threading.Event().wait(0.5)
        dashboard()
        t.join(10)
        conn.close()
    assert not t.is_alive()
    assert isinstance(out.get("error"), src.AgentError), out


@pytest.mark.parametrize(
    "direct,words",
    [
        ({"listen": "127.0.0.1", "peer": "127.0.0.1", "token": "short"}, "token"),
        ({"listen": "127.0.0.1; reboot", "peer": "127.0.0.1", "token": "a" * 64}, "address"),
        ({"listen": 2130706433, "peer": "127.0.0.1", "token": "a" * 64}, "address"),
        ("127.0.0.1", "parameters"),
    ],
)
def test_bad_direct_parameters_are_refused_before_listening(pair, direct, words):
    _, dst, events = pair
    with pytest.raises(dst.AgentError, match=words):
        dst.cmd_receive({"name": "c1", "migration": 1, "what": "rootfs", "direct": direct})
    assert not any("listening" in e for e in events)


def test_bad_ports_are_refused_by_the_sender(pair):
    src, _, _ = pair
    for port in (0, 70000, "22", True):
        params = send_params("a" * 64, 1)
        params["direct"]["port"] = port
        with pytest.raises(src.AgentError, match="port"):
            src.cmd_send(params)


def test_a_stream_altered_on_the_way_is_never_put_in_place(pair, tmp_path):
    """Someone on the path sees the connection's first line, then sends a tar of their own
    (issue 12: the stream used to be unpacked before the two hashes were compared)."""
    src, dst, events = pair
    token = secrets.token_hex(32)
    r, port = receiver(dst, events, token)
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = make_tar([("c1", "dir", None), ("c1/config", "file", b"lxc.uts.name = evil\n"), ("c1/rootfs", "dir", None)])
    with socket.socket() as mitm:
        mitm.bind(("127.0.0.1", 0))
        mitm.listen(1)
        out = {}

        def run():
            try:
                src.cmd_send(send_params(token, mitm.getsockname()[1]))
            except Exception as e:  # noqa: BLE001
                out["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        conn, _ = mitm.accept()
        with conn:
            first = b""
            while not first.endswith(b"\n"):
                first += conn.recv(1)
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(first + evil + os.urandom(32))
                s.shutdown(socket.SHUT_WR)
                r.join(10)
    t.join(10)
    assert isinstance(r.error, dst.AgentError), r.result
    assert not os.path.lexists(Path(dst.S.LXC_PATH) / "c1")
    assert [n for n in os.listdir(dst.S.LXC_PATH) if n != "c1"] == []  # nothing staged is left either


def test_a_receiver_that_resets_mid_stream_gets_one_sentence_from_the_sender(pair):
    """The target's agent killed mid-rootfs (a fresh clone's CI, under TLS): the sender's failed
    write is said as what it is, not as an agent crash of another kind (tarfile writes its last
    block while unwinding, into the buffer the failed TLS send still held a view of)."""
    src, dst, _ = pair
    token, keys = secrets.token_hex(32), PageLinkKeys(1)
    ctx = dst.pagelink.stream_context(dst.pagelink.check_tls(keys.tls("target")), server=True)
    with socket.create_server(("127.0.0.1", 0)) as srv:

        def serve():
            conn, _ = srv.accept()
            with ctx.wrap_socket(conn, server_side=True) as s:
                got = 0
                while got < (1 << 20):  # the hello and part of the first chunks, then killed
                    got += len(s.recv(1 << 16))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # an RST

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with pytest.raises(src.AgentError) as e:
            src.cmd_send(send_params(token, srv.getsockname()[1], tls=keys.tls("source")))
        t.join(10)
    assert e.value.message.startswith("The receiving host closed the connection"), e.value.message
