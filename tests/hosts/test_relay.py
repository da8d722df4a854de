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
import hashlib, json, os, sys
cmd = sys.argv[1]
line = b""
while not line.endswith(b"\n"):  # unbuffered, as the agent does: the stream follows at once
    line += os.read(0, 1)
p = json.loads(line)
with open(p["pids"], "a") as f:
    f.write(f"{os.getpid()}\n")
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
    with sshd_host(settings, tmp_path, "relayed") as (_srv, row):
        (tmp_path / "agent.py").write_text(AGENT)
        row.agent, row.pids = str(tmp_path / "agent.py"), tmp_path / "pids"
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
    pids = [int(x) for x in pids_file.read_text().split()]
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
