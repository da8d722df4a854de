"""The relay of a migration's bytes through OpenSSH client processes, against a real OpenSSH
server on loopback. A small stand-in agent plays `send` and `receive` (the real ones need a
lab host; tests/migration's lab tests run them)."""

import hashlib
import os
import subprocess
import time

import pytest

from hosts import ssh
from tests.support.helpers import sshd_host

pytestmark = pytest.mark.e2e

AGENT = r"""
import hashlib, json, os, sys, time
BORN = time.time()
cmd = sys.argv[1]
line = b""
while not line.endswith(b"\n"):  # unbuffered, as the agent does: the stream follows at once
    got = os.read(0, 1)
    if not got:  # its input ended before any parameters: nothing was asked (as the agent does)
        sys.exit(0)
    line += got
p = json.loads(line)
with open(p["pids"], "a") as f:
    f.write(f"{os.getpid()} {BORN} {os.environ.get('SSH_CONNECTION', '')}\n")
if cmd == "pages-attach":  # as the page relay does on every attach: a hello, then it listens
    os.write(1, b"hello\n")
    while os.read(0, 1 << 16):
        pass
    sys.exit(0)
if cmd == "send":
    for i in range(p["mib"]):
        sys.stdout.buffer.write(hashlib.sha256(str(i).encode()).digest() * 32768)
    sys.stdout.flush()
    if p.get("hang"):
        import time
        time.sleep(600)
    sys.exit(p.get("exit", 0))
n, h = 0, hashlib.sha256()
while d := os.read(0, 1 << 20):
    n += len(d)
    h.update(d)
    if p.get("full_after") and n > p["full_after"]:
        print(json.dumps({"type": "error", "message": "No space left on device"}), flush=True)
        sys.exit(1)
print(json.dumps({"type": "event", "received": n}))
print(json.dumps({"type": "result", "data": {"bytes": n, "sha256": h.hexdigest()}}), flush=True)
"""


@pytest.fixture
def host(db, settings, tmp_path):
    with sshd_host(settings, tmp_path, "relayed") as (srv, row):
        (tmp_path / "agent.py").write_text(AGENT)
        row.agent, row.pids, row.srv = str(tmp_path / "agent.py"), tmp_path / "pids", srv
        yield row


def _pair(host, send: dict, receive: dict):
    common = {"pids": str(host.pids)}
    sender = ssh.AgentProcess(host, host.agent, "send", {**common, **send}, "sending host")
    receiver = ssh.AgentProcess(host, host.agent, "receive", {**common, **receive}, "receiving host")
    return sender, receiver


def _expected(mib: int) -> tuple[int, str]:
    h = hashlib.sha256()
    for i in range(mib):
        h.update(hashlib.sha256(str(i).encode()).digest() * 32768)
    return mib << 20, h.hexdigest()


def _all_gone(pids_file, within: float = 10) -> bool:
    pids = [int(line.split()[0]) for line in pids_file.read_text().splitlines()]
    until = time.monotonic() + within
    while time.monotonic() < until:
        if not any(os.path.exists(f"/proc/{p}") for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_every_byte_arrives_in_order_with_progress_and_the_receivers_result(host):
    seen = []
    n, result = ssh.relay(*_pair(host, {"mib": 48}, {}), on_bytes=seen.append)
    size, digest = _expected(48)
    assert n == size
    assert result == {"bytes": size, "sha256": digest}
    assert seen == sorted(seen) and seen[-1] == size and len(seen) > 1
    assert _all_gone(host.pids)


def test_streams_started_ahead_wait_for_their_parameters(host):
    common = {"pids": str(host.pids)}
    sender = ssh.AgentProcess(host, host.agent, "send", None, "sending host")
    receiver = ssh.AgentProcess(host, host.agent, "receive", None, "receiving host")
    time.sleep(1)  # connected and started: neither has done anything yet
    assert not host.pids.exists()
    sender.begin({**common, "mib": 4})
    receiver.begin(common)
    n, result = ssh.relay(sender, receiver)
    assert (n, result) == (4 << 20, {"bytes": 4 << 20, "sha256": _expected(4)[1]})


def test_a_receiver_that_fails_says_why_and_both_ends_stop(host):
    with pytest.raises(ssh.AgentFailed, match="No space left on device"):
        ssh.relay(*_pair(host, {"mib": 64}, {"full_after": 8 << 20}))
    assert _all_gone(host.pids)


def test_a_sender_that_fails_fails_the_transfer(host):
    with pytest.raises(ssh.AgentFailed, match="exit status 3"):
        ssh.relay(*_pair(host, {"mib": 1, "exit": 3}, {}))
    assert _all_gone(host.pids)


def test_a_cancel_mid_stream_ends_both_agents_on_the_host(host):
    class Cancelled(Exception):
        pass

    def on_bytes(n):
        if n > 4 << 20:
            raise Cancelled

    with pytest.raises(Cancelled):
        ssh.relay(*_pair(host, {"mib": 64, "hang": True}, {}), on_bytes=on_bytes)
    assert _all_gone(host.pids)


def test_a_host_presenting_another_key_runs_nothing(host, tmp_path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    host.key_type, host.key_data = other.with_suffix(".pub").read_text().split()[:2]
    with pytest.raises(ssh.SSHError, match="Lost the connection to relayed"):
        ssh.relay(*_pair(host, {"mib": 1}, {}))
    assert not host.pids.exists()  # neither agent started


def test_the_client_takes_no_configuration_but_ours(host):
    argv = ssh.ssh_argv(host, "true")
    opts = dict(a.split("=", 1) for a in argv if "=" in a)
    assert argv[:3] == ["ssh", "-F", "/dev/null"]  # no ~/.ssh/config, no /etc/ssh/ssh_config
    assert opts["StrictHostKeyChecking"] == "yes" and opts["BatchMode"] == "yes"
    assert opts["ForwardAgent"] == "no" and opts["IdentityAgent"] == "none" and opts["IdentitiesOnly"] == "yes"
    assert argv[-3:] == ["--", "127.0.0.1", "true"]
    known = open(opts["UserKnownHostsFile"]).read()
    assert known == f"[127.0.0.1]:{host.port} {host.key_type} {host.key_data}\n"


def _connections(srv) -> int:
    """TCP connections the host's sshd took, logged in or not (sshd's MaxStartups counts the
    unauthenticated ones)."""
    return (srv.dir / "sshd.log").read_text(errors="replace").count("Connection from ")


def _attaches(pids_file, srv) -> int:
    """pages-attach sessions run on the host of `srv` (SSH_CONNECTION names its port)."""
    if not pids_file.exists():
        return 0
    return sum(1 for line in pids_file.read_text().splitlines() if line.split()[-1] == str(srv.port))


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _crash(srv) -> None:
    """The host "crashes": its sshd and every session under it die at once (SIGKILL)."""
    pids = [srv.proc.proc.pid, *_descendants(srv.proc.proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    srv.proc.proc.wait(5)


def _masters(srv) -> int:
    """OpenSSH connection masters (SSHLink) to the host of `srv` running on this machine."""
    n = 0
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"ControlMaster=yes" in argv and b"-p" in argv and str(srv.port).encode() in argv:
            n += 1
    return n


def _wait(cond, within: float, what: str) -> None:
    until = time.monotonic() + within
    while not cond():
        assert time.monotonic() < until, what
        time.sleep(0.05)


def test_a_page_pump_whose_target_dies_costs_the_source_nothing(host, monkeypatch):
    """A post-copy's page pump, its target host gone: the source, which holds the frozen
    container, gets no new SSH connection and no session while the pump tries the target
    again and again (seen failing: every round connected to the source afresh, hundreds of
    connections in 30 s on the lab, until its sshd refused everyone, the admin and the
    dashboard included), and the pull re-attaches once the target answers again, with no
    new connection to the source."""
    from hosts.models import Host
    from tests.support.stack import SSHServer

    source_srv = host.srv
    target_srv = SSHServer(ssh.public_key_line()).start()
    try:
        pub = (target_srv.dir / "host_key.pub").read_text().split()
        target = Host.objects.create(
            name="pump-target",
            address="127.0.0.1",
            port=target_srv.port,
            username="root",
            status=Host.Status.ONLINE,
            key_type=pub[0],
            key_data=pub[1],
            fingerprint=target_srv.fingerprint(),
        )
        monkeypatch.setattr(ssh.HostConnection, "ensure_agent", lambda self: host.agent)  # the stand-in
        pump = ssh.PagePump(host, target, {"pids": str(host.pids), "name": "pc"}).start()
        try:
            _wait(lambda: pump.bytes_down >= 6 and pump.bytes_up >= 6, 30, "a first round")
            connections, attaches = _connections(source_srv), _attaches(host.pids, source_srv)
            _crash(target_srv)
            _wait(lambda: any("link ended" in e or "connect" in e.lower() for e in pump.errors), 20, "the fault seen")
            rounds = pump.rounds
            time.sleep(4)  # some 40 tries to connect to the target at its pace (0.1 s)
            assert (_connections(source_srv), _attaches(host.pids, source_srv)) == (connections, attaches), pump.errors
            assert pump.rounds == rounds  # no round starts with one side down
            down = pump.bytes_down
            target_srv.start()  # it answers again, on the same port with the same key
            _wait(lambda: pump.bytes_down > down, 30, "the pump to re-attach")
            assert _connections(source_srv) == connections  # still the first connection to the source
            assert _attaches(host.pids, source_srv) == attaches + 1
            assert (_masters(source_srv), _masters(target_srv)) == (1, 1)  # one connection to each
        finally:
            pump.stop()
        assert _all_gone(host.pids)
        _wait(lambda: _masters(source_srv) + _masters(target_srv) == 0, 10, "no connection left once it stopped")
    finally:
        target_srv.cleanup()


def test_a_link_nobody_uses_ends_by_itself(host, monkeypatch):
    """A held connection whose owner is gone (a worker killed mid-pull never closes its
    links) ends IDLE_S after its last session."""
    monkeypatch.setattr(ssh.SSHLink, "IDLE_S", 2)
    link = ssh.SSHLink(host, "source")
    try:
        link.wait_ready()
        assert link.alive() and _masters(host.srv) == 1
        p = ssh.AgentProcess(host, host.agent, "send", {"pids": str(host.pids), "mib": 0}, "source", link)
        assert p.proc.wait(10) == 0 and host.pids.exists()
        logins = (host.srv.dir / "sshd.log").read_text().count("Accepted publickey")
        assert logins == 1  # the session ran on the link, with no login of its own
        p.close()
        _wait(lambda: _masters(host.srv) == 0, 10, "the idle link to end")  # (asking it would keep it busy)
        assert not link.alive()
    finally:
        link.close()


def test_an_agent_started_ahead_takes_its_call_and_an_unused_one_ends(host, monkeypatch):
    """A migration starts its restore's agent before the freeze (HostConnection.prestart_agent):
    the process starts and waits; the call later sends it its parameters, and no second agent
    starts. One never called is closed: its input ends and it goes."""
    monkeypatch.setattr(ssh.HostConnection, "ensure_agent", lambda self: host.agent)
    with ssh.connect(host) as conn:
        pre = conn.prestart_agent("migrate-restore")
        time.sleep(1.5)  # started, and waiting for its line: it has not read anything yet
        assert not host.pids.exists()
        asked = time.time()
        r = conn.run_agent("migrate-restore", {"pids": str(host.pids)}, prestarted=pre)
        assert r.data == {"bytes": 0, "sha256": hashlib.sha256().hexdigest()}
        lines = host.pids.read_text().splitlines()
        assert len(lines) == 1 and float(lines[0].split()[1]) < asked - 1.0, lines  # the one started ahead
        # Taken once: a second call with the same handle starts an agent of its own.
        conn.run_agent("migrate-restore", {"pids": str(host.pids)}, prestarted=pre)
        assert len(host.pids.read_text().splitlines()) == 2
        unused = conn.prestart_agent("migrate-restore")
        _wait(lambda: _running(host.agent) == 1, 10, "the unused agent to start")
        unused.close()
        _wait(lambda: _running(host.agent) == 0, 10, "the unused agent to end")
        with pytest.raises(ValueError):
            conn.prestart_agent("migrate-dump")  # only what may be started ahead
    assert _all_gone(host.pids)


def _running(agent: str) -> int:
    """Processes of this test's stand-in agent on the machine."""
    n = 0
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                n += agent.encode() in f.read()
        except OSError:
            pass
    return n
