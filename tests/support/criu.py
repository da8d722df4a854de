"""Helpers for tests that drive the host agent directly on the lab (no dashboard): the agent's zipapp on each host, run over SSH, and small containers made with it."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from contextlib import contextmanager

import pytest

from hosts.agent import AGENT_SUBCOMMANDS, agent_source
from lab import core
from tests.support.lab import ssh_argv

REMOTE_AGENT = "/root/ctweb_agent_test.pyz"  # the zipapp the dashboard ships


# Written whole (a new file renamed over the old): a snapshot, which catches the container at
# any instant, never holds a half-written (empty) counter.
COUNTER = (
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.2; done"
)
COUNTER_TICK_S = 0.2


def ticks_since(t0: float) -> int:
    """The most COUNTER can have counted since time.monotonic() was t0 (and two for the edges)."""
    return int((time.monotonic() - t0) / COUNTER_TICK_S) + 2


def _ip(octet: int) -> str:
    return str(core.subnet().network_address + octet)


def _ssh_args(lab, host: dict, *cmd: str) -> list[str]:
    return ssh_argv(lab, host, shlex.join(cmd))  # the remote shell re-parses the command line


def ssh(lab, host, *cmd: str, check: bool = True, timeout: float = 120, input: bytes | None = None):
    proc = subprocess.run(
        _ssh_args(lab, host, *cmd),
        input=input,
        capture_output=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} on {host['name']} -> {proc.returncode}\n{proc.stdout!r}\n{proc.stderr!r}")
    return proc


def agent(lab, host, sub: str, params: dict, timeout: float = 300) -> tuple[list[dict], dict]:
    """Run one agent subcommand; returns (events, final line). The final line is the
    result or the error object; every line must be JSON."""
    assert sub in AGENT_SUBCOMMANDS
    proc = subprocess.run(
        _ssh_args(lab, host, "python3", REMOTE_AGENT, sub),
        input=(json.dumps(params) + "\n").encode(),
        capture_output=True,
        timeout=timeout,
    )
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]
    assert lines, proc.stderr.decode()
    final = lines[-1]
    assert final["type"] in ("result", "error"), lines
    assert all(line["type"] == "event" for line in lines[:-1])
    assert (proc.returncode == 0) == (final["type"] == "result"), (proc.returncode, final)
    return lines[:-1], final


def ok(lab, host, sub, params, timeout=300) -> dict:
    events, final = agent(lab, host, sub, params, timeout)
    assert final["type"] == "result", json.dumps(final, indent=1)[:6000]
    return final["data"]


def fail(lab, host, sub, params, timeout=300) -> dict:
    events, final = agent(lab, host, sub, params, timeout)
    assert final["type"] == "error", json.dumps(final, indent=1)[:3000]
    return final


def wait_for(pred, timeout: float = 15.0, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def read_file(lab, host, path: str) -> str:
    return ssh(lab, host, "cat", path, check=False).stdout.decode().strip()


def counter(lab, host, name: str) -> int:
    text = read_file(lab, host, f"/var/lib/lxc/{name}/rootfs/tmp/counter")
    return int(text) if text.isdigit() else 0


def state(lab, host, name: str) -> dict:
    rows = ok(lab, host, "list", {})["containers"]
    return next(r for r in rows if r["name"] == name)


def create(lab, host, name: str, octet: int, template: str = "busybox", command=None) -> dict:
    params = {
        "name": name,
        "template": template,
        "network": {"ipv4": _ip(octet), "prefix": 24, "bridge": "lxcbr0"},
    }
    if command:
        params["command"] = command
    return ok(lab, host, "create", params)


@pytest.fixture(scope="module")
def hosts(lab, tmp_path_factory):
    pyz = tmp_path_factory.mktemp("agent") / "ctweb_agent_test.pyz"
    pyz.write_bytes(agent_source()[0])
    for h in lab["hosts"]:
        scp = subprocess.run(
            [
                "scp",
                "-q",
                "-i",
                str(lab["key"]),
                "-o",
                "BatchMode=yes",
                "-o",
                f"UserKnownHostsFile={lab['known_hosts']}",
                str(pyz),
                f"root@{h['address']}:{REMOTE_AGENT}",
            ],
            capture_output=True,
            timeout=60,
        )
        assert scp.returncode == 0, scp.stderr
    return lab["hosts"]


def memcheck(mib: int = 32, setup: str = "", each: str = "") -> str:
    """A program holding `mib` MiB of a pattern and checking its SHA-256 every second: "OK n"
    (or "BAD n") in /tmp/memcheck, n its tick. `setup` runs before the loop, `each` (lines
    indented four spaces) after each check, with `v` ("OK"/"BAD") and `n` set."""
    return (
        "import hashlib, mmap, os, time\n"
        f"buf = bytearray(bytes(range(256)) * 4096 * {mib})\n"
        "want = hashlib.sha256(buf).hexdigest()\n"
        f"{setup}"
        "n = 0\n"
        "while True:\n"
        "    n += 1\n"
        "    v = 'OK' if hashlib.sha256(buf).hexdigest() == want else 'BAD'\n"
        "    with open('/tmp/memcheck.tmp', 'w') as f:\n"
        "        f.write(f'{v} {n}\\n')\n"
        "    os.replace('/tmp/memcheck.tmp', '/tmp/memcheck')\n"
        f"{each}"
        "    time.sleep(1)\n"
    )


# 32 MiB of a pattern checked every second, like a small idle service.
MEMCHECK_32 = memcheck(32)

# The container rewrites files that every snapshot shares: in place (same inode), and their modes.
REWRITE = (
    "printf 'XXXX' | dd of=/etc/debian_version conv=notrunc status=none; "
    "printf 'YYYY' | dd of=/usr/bin/python3 bs=1 seek=100 conv=notrunc status=none 2>/dev/null || true; "
    "chmod 600 /etc/issue; chmod 700 /usr/share/doc; echo more >> /etc/hostname"
)


def memcheck_tick(lab, host, name: str) -> int:
    """The tick of a memcheck container's last check, 0 unless it said OK."""
    text = read_file(lab, host, f"/var/lib/lxc/{name}/rootfs/tmp/memcheck")
    return int(text.split()[1]) if text.startswith("OK ") else 0


def attach(lab, host, name: str, script: str):
    """A shell script run inside the container."""
    return ssh(lab, host, "lxc-attach", "-n", name, "--", "/bin/sh", "-c", script)


@contextmanager
def memcheck_container(lab, host, name: str, octet: int, program: str = MEMCHECK_32):
    """A debian container running `program` (a memcheck) that has checked its pattern twice;
    deleted afterwards with its snapshots (the delete must succeed when the body did)."""
    create(lab, host, name, octet, template="debian", command=["python3", "-c", program])
    try:
        assert wait_for(lambda: memcheck_tick(lab, host, name) >= 2, timeout=30), read_file(
            lab, host, f"/var/lib/lxc/{name}/rootfs/tmp/memcheck"
        )
        yield
    finally:
        _events, final = agent(lab, host, "delete", {"name": name})
        ssh(lab, host, "rm", "-rf", f"/var/lib/ctweb/snapshots/{name}", check=False)
    assert final["type"] == "result", final


# Every entry of a snapshot tree (path, type, mode, owner, size, mtime, link target) and every
# file's SHA-256: one digest per snapshot.
TREE_SUM = (
    "cd {d} && {{ find . -printf '%p %y %m %U %G %s %T@ %l\\n' | LC_ALL=C sort; "
    "find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum; }} | sha256sum"
)


def tree_sums(lab, host, base: str, snaps) -> dict:
    """{snapshot: one digest of its whole tree} for the snapshots `snaps` under `base` on `host`."""
    return {s: ssh(lab, host, "sh", "-c", TREE_SUM.format(d=f"{base}/{s}")).stdout.decode().split()[0] for s in snaps}
