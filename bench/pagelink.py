"""Microbench of post-copy's direct page link (hosts/agent/ctweb_agent/pagelink.py): two page
relays, the agent's own code, one in each lab host's network namespace (the source listening
on lab-a's address, the target connecting from lab-b's), linked over TLS 1.3 with fresh
per-migration certificates; this process plays both CRIU processes (socketpairs: no network)
and streams N MiB of pages through. Beside it, in the same run, a plain TCP stream between
the same two namespaces (Python, 1 MiB writes). Root, with the lab up:

    CTWEB_LAB_ID=2 python -m bench.pagelink --mib 1024 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hosts.pagecerts import PageLinkKeys
from lab import core

AGENT_DIR = str(Path(__file__).resolve().parents[1] / "hosts" / "agent")
RELAY = (
    "import os, sys; sys.path.insert(0, sys.argv[1]); from ctweb_agent import lazy; "
    "os.dup2(int(sys.argv[2]), 3); os.close(int(sys.argv[2])); lazy.cmd_pages_relay({})"
)
PLAIN_RECV = (
    "import socket, sys, time\n"
    "s = socket.create_server((sys.argv[1], 0)); print(s.getsockname()[1], flush=True)\n"
    "c, _ = s.accept(); buf = memoryview(bytearray(1 << 20)); n = 0; t = None\n"
    "while True:\n"
    "    k = c.recv_into(buf)\n"
    "    t = t or time.monotonic()\n"
    "    if not k: break\n"
    "    n += k\n"
    "print(n, time.monotonic() - t, flush=True)\n"
)
PLAIN_SEND = (
    "import socket, sys\n"
    "c = socket.create_connection((sys.argv[1], int(sys.argv[2])), source_address=(sys.argv[3], 0))\n"
    "buf = bytes(1 << 20)\n"
    "for _ in range(int(sys.argv[4])): c.sendall(buf)\n"
    "c.close()\n"
)


def netns(host: str) -> list[str]:
    return ["ip", "netns", "exec", core._netns(host)]


def plain(a: str, b: str, mib: int) -> float:
    """MiB/s of a plain TCP stream lab-a -> lab-b (what the receiver measured)."""
    recv = subprocess.Popen([*netns("lab-b"), sys.executable, "-c", PLAIN_RECV, b], stdout=subprocess.PIPE, text=True)
    port = recv.stdout.readline().strip()
    subprocess.run([*netns("lab-a"), sys.executable, "-c", PLAIN_SEND, b, port, a, str(mib)], check=True)
    n, secs = recv.stdout.readline().split()
    recv.wait()
    return int(n) / 2**20 / float(secs)


class Relay:
    def __init__(self, tmp: Path, host: str, role: str, direct: dict, agent):
        self.mdir = tmp / role
        self.mdir.mkdir(mode=0o700)
        agent.install(str(self.mdir), role, agent.check_params(direct, role))
        self.criu, theirs = socket.socketpair()
        fd = os.dup(theirs.fileno())
        theirs.close()
        env = dict(os.environ, CTWEB_RELAY=json.dumps({"dir": str(self.mdir), "role": role, "direct": True}))
        self.proc = subprocess.Popen(
            [*netns(host), sys.executable, "-c", RELAY, AGENT_DIR, str(fd)], env=env, pass_fds=(fd,)
        )
        os.close(fd)

    def status(self) -> dict:
        try:
            return json.loads((self.mdir / "page-relay-status.json").read_text())
        except (OSError, ValueError):
            return {}

    def cpu(self) -> float:
        """CPU seconds the relay used so far (user + system)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.criu.close()


def tls_link(a: str, b: str, mib: int) -> tuple[float, dict]:
    """MiB/s of pages through the two relays' TLS link, from the first byte the target's
    CRIU end got to the last."""
    sys.path.insert(0, AGENT_DIR)
    from ctweb_agent import pagelink  # the agent's own checks and file layout

    keys = PageLinkKeys(0)
    tmp = Path(tempfile.mkdtemp(prefix="ctweb-pagelink-"))
    source = Relay(tmp, "lab-a", "source", keys.for_source(a, b), pagelink)
    target = None
    try:
        deadline = time.monotonic() + 10
        while not (source.status().get("direct") or {}).get("port"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the source relay did not listen: {source.status()}")
            time.sleep(0.01)
        port = source.status()["direct"]["port"]
        target = Relay(tmp, "lab-b", "target", keys.for_target(b, a, port), pagelink)
        chunk = os.urandom(1 << 20)

        def produce():
            for _ in range(mib):
                source.criu.sendall(chunk)

        threading.Thread(target=produce, daemon=True).start()
        buf = memoryview(bytearray(1 << 20))
        got, t0 = 0, None
        while got < mib << 20:
            n = target.criu.recv_into(buf)
            if not n:
                raise RuntimeError(f"the target's CRIU end closed after {got} bytes")
            t0 = t0 or time.monotonic()
            got += n
        secs = time.monotonic() - t0
        return got / 2**20 / secs, {**target.status(), "cpu": (source.cpu(), target.cpu())}
    finally:
        source.stop()
        if target is not None:
            target.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    a, b = core.host_address(0), core.host_address(1)
    for i in range(args.repeat):
        p = plain(a, b, args.mib)
        t, st = tls_link(a, b, args.mib)
        print(
            f"run {i + 1}: plain TCP {p:.0f} MiB/s, relays over TLS {t:.0f} MiB/s, ratio {t / p:.2f} "
            f"(path {st.get('path')}, connects {(st.get('direct') or {}).get('connects')}, relays' CPU "
            f"{st['cpu'][0]:.2f} s + {st['cpu'][1]:.2f} s); "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
