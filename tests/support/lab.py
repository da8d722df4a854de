"""Helpers for tests on the real lab: a command on a lab host over SSH, the bare host lab-z, a container made through the API, and the two programs whose memory the tests check (a counter and a memory pattern)."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import time

import pytest

from lab import core
from tests.support.stack import Api, wait_for

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 1; done"


# A known memory pattern: 8 MB of random hex held only in the shell's memory. Its checksum
# is written once at start (pattern.start) and again every second (pattern.now): the two
# agree only while that very memory lives on (a cold start draws a new pattern).
PATTERN = (
    "v=$(head -c 4000000 /dev/urandom | od -An -tx1 | tr -d ' \\n'); echo \"$v\" | md5sum > /tmp/pattern.start; "
    'i=0; while true; do i=$((i+1)); echo "$v" | md5sum > /tmp/pattern.now; echo $i > /tmp/counter; sleep 1; done'
)


SERVICE = (
    "import socket\n"
    "s = socket.socket(); s.bind(('0.0.0.0', 7000)); s.listen()\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(b'hello from inside\\n'); c.close()\n"
)


# The dashboard of this session that registered the lab's hosts: a lab serves one dashboard
# (one database) at a time, or each would adopt, check and tidy the other's containers.
_DASHBOARD: list[str] = []


def claim(who: str) -> str | None:
    """Register `who` as the lab's dashboard for this session; the other one's name if taken."""
    if _DASHBOARD and _DASHBOARD[0] != who:
        return _DASHBOARD[0]
    _DASHBOARD[:] = [who]
    return None


def release(who: str) -> None:
    if _DASHBOARD == [who]:
        _DASHBOARD.clear()


def ssh_argv(lab, host: dict, *remote: str) -> list[str]:
    """The ssh command line that runs `remote` on a lab host as its SSH user, with the lab's key
    and its pinned host keys. The remote shell parses the words joined by spaces: quote them."""
    return [
        "ssh",
        "-i",
        str(lab["key"]),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={lab['known_hosts']}",
        "-o",
        "ConnectTimeout=10",
        "-p",
        str(host["port"]),
        f"{host['username']}@{host['address']}",
        "--",
        *remote,
    ]


def on_host(lab, name: str, *argv: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a command on a lab host as an operator would: over SSH with its pinned key (with
    `input`, that text on its standard input)."""
    host = next(h for h in lab["hosts"] if h["name"] == name)
    return subprocess.run(ssh_argv(lab, host, *argv), input=input, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def bare(lab, lab_stack):
    """lab-z, bare (lab/core.py `up_bare`), with the lab's key (for on_host) and the dashboard's."""
    t0 = time.monotonic()
    core.up_bare(lab["pubkey"])
    info = core.up_bare(lab_stack.dashboard_public_key())
    print(f"\nbare host up in {time.monotonic() - t0:.1f}s")
    lab["hosts"].append(info)
    with open(lab["known_hosts"], "a") as f:
        f.write(f"{info['address']} {info['host_key']}\n")
    yield info
    lab["hosts"].remove(info)  # the session's down() stops it with the others, and the proxy


def fingerprint(host_key: str) -> str:
    """The SHA256 fingerprint of a host key line, as the dashboard offers it for trust."""
    blob = base64.b64decode(host_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def create(api: Api, **body) -> dict:
    r = api.post("/api/v1/containers/", json=body)
    assert r.status_code == 202, r.text
    return api.wait_operation(r.json()["id"], timeout=120)


def ping(ip: str) -> bool:
    return subprocess.run(["ping", "-c", "1", "-W", "1", ip], capture_output=True).returncode == 0


def pattern(lab, host: str, name: str) -> tuple[str, str]:
    """(checksum at start, checksum now) of a PATTERN container's memory. The shell rewrites
    pattern.now every second: a read that catches it half-written is taken again."""

    def read():
        out = on_host(lab, host, "lxc-attach", "-n", name, "--", "cat", "/tmp/pattern.start", "/tmp/pattern.now")
        assert out.returncode == 0, out.stderr
        sums = [line.split()[0] for line in out.stdout.splitlines() if len(line.split()) == 2]
        return (sums[0], sums[1]) if len(sums) == 2 else None

    return wait_for(read, 10, f"{name}'s memory pattern checksums", interval=0.2)


def init_task(lab, host: str, name: str) -> tuple[int, int]:
    """(host pid, start time in clock ticks since boot) of a container's init: the same pair
    later means the same task, never stopped (a restart or a restore makes a new one)."""
    script = f"p=$(lxc-info -n {name} -p -H) && echo $p $(sed 's/.*) //' /proc/$p/stat | cut -d' ' -f20)"
    out = on_host(lab, host, script)  # one remote command line (ssh joins its words)
    assert out.returncode == 0, out.stderr
    pid, start = out.stdout.split()
    return int(pid), int(start)


def counter(lab, host: str, name: str) -> int:
    """The COUNTER container's count. Its shell rewrites the file every second (`echo >`
    truncates first): a read that catches it empty is taken again (seen in a fresh-clone run)."""

    def read():
        out = on_host(lab, host, "lxc-attach", "-n", name, "--", "cat", "/tmp/counter")
        assert out.returncode == 0, out.stderr
        return int(out.stdout) if out.stdout.strip().isdigit() else None

    return wait_for(read, 10, f"{name}'s counter", interval=0.2)
