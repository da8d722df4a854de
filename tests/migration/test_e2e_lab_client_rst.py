"""A live migration does not reset its clients' TCP connections: a client that keeps sending
while the container is dumped, moved and restored loses none of them, and no RST comes from
the container's address. Seen on the lab before the fix (1 of 14 stop-and-copy migrations
under load, and in `make bench`): the source's network namespace answered a client's segment
with an RST right as `lxc-checkpoint -s` ended (the processes and their sockets gone, CRIU's
lock no longer holding). Many connections and a request every half millisecond on the idle
ones make a segment in that moment likely (hosts/agent/ctweb_agent/criu.py _unplug)."""

import subprocess
import time

import pytest

from lab import core
from tests.support.lab import create
from tests.support.rstwatch import RstWatch
from tests.support.stack import ok, run_op, wait_for
from tests.support.tcpgap import ECHO_SERVICE, GapClient

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

MIGRATIONS = 4

# Inside a lab host's network namespace: each TCP segment to or from the container's address on
# a container veth of that host, as "wall-clock-time to|from", one per line.
VETH_WATCH = (
    "import socket, sys, time\n"
    "ip = socket.inet_aton(sys.argv[1])\n"
    "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))\n"
    "while True:\n"
    "    f, a = s.recvfrom(64)\n"
    "    if not a[0].startswith('veth') or f[12:14] != b'\\x08\\x00' or f[23] != 6:\n"
    "        continue\n"
    "    d = 'to' if f[30:34] == ip else 'from' if f[26:30] == ip else ''\n"
    "    if d:\n"
    "        print(f'{time.time():.6f} {d}', flush=True)\n"
)


@pytest.mark.parametrize("strategy", ["stop-and-copy", "post-copy"])
def test_a_migration_resets_no_client_connection(bob, lab, strategy):
    name = "keep-" + strategy.split("-")[0]
    ok(create(bob, name=name, host="lab-a", template="debian", command=["python3", "-c", ECHO_SERVICE]))
    clients = []
    rsts = None
    try:
        ip = bob.get(f"/api/v1/containers/{name}/").json()["ipv4"]
        clients.append(wait_for(lambda: GapClient(ip), 30, "the echo service").start())
        # The storm: no spreading while no answer comes, so the container's absence is full
        # of segments (each connection sends once, then on TCP's retransmission clock).
        clients.append(GapClient(ip, connections=600, every_s=0.0005, spread=0).start())
        rsts = RstWatch.start_if_root(ip)
        host = "lab-a"
        for i in range(MIGRATIONS):
            target = "lab-b" if host == "lab-a" else "lab-a"
            t0 = time.monotonic()
            body = {"target_host": target, "strategy": strategy}
            ok(run_op(bob, "POST", f"/api/v1/containers/{name}/migrate", body))
            time.sleep(0.5)
            t1 = time.monotonic()
            lost = [line for c in clients for line in c.losses_between(t0, t1)]
            reset = rsts.between(t0, t1) if rsts is not None else []
            assert not lost, f"migration {i + 1} ({host} -> {target}) lost {lost}; RSTs seen: {reset[:10]}"
            assert not [line for line in reset if f"{ip}:" in line.split(" -> ")[0]], reset[:10]
            host = target
    finally:
        for c in clients:
            c.stop()
        if rsts is not None:
            rsts.stop()
        run_op(bob, "DELETE", f"/api/v1/containers/{name}/")


def test_no_client_segment_reaches_the_source_copy_once_it_stopped_answering(bob, lab, tmp_path):
    """What made the RST possible, without waiting for the rare moment: on the source, client
    segments kept reaching the container's namespace for the whole dump after it last answered
    (0.6 s of them here), the last ones while it was torn down. Now none arrives more than a
    few milliseconds after its last answer: the veth is out of the bridge before the dump."""
    name = "quiet-src"
    ok(create(bob, name=name, host="lab-a", template="debian", command=["python3", "-c", ECHO_SERVICE]))
    client = watch = None
    try:
        ip = bob.get(f"/api/v1/containers/{name}/").json()["ipv4"]
        client = wait_for(lambda: GapClient(ip), 30, "the echo service").start()
        out = open(tmp_path / "source-veth.txt", "w")
        argv = ["ip", "netns", "exec", f"{core.NETNS_PREFIX}a", "python3", "-c", VETH_WATCH, ip]
        watch = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL)
        time.sleep(1)
        body = {"target_host": "lab-b", "strategy": "stop-and-copy"}
        ok(run_op(bob, "POST", f"/api/v1/containers/{name}/migrate", body))
        time.sleep(0.5)
        assert client.lost == 0, client.losses
    finally:
        if watch is not None:
            watch.terminate()
            watch.wait(5)
        if client is not None:
            client.stop()
        run_op(bob, "DELETE", f"/api/v1/containers/{name}/")
    seen = [line.split() for line in (tmp_path / "source-veth.txt").read_text().splitlines()]
    last_answer = max(float(t) for t, d in seen if d == "from")
    late = [float(t) - last_answer for t, d in seen if d == "to" and float(t) > last_answer + 0.05]
    assert not late, (
        f"{len(late)} client segments reached the source copy after its last answer, up to +{max(late):.3f} s"
    )
