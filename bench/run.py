"""`make bench`: measurements on the real lab, written to bench/results/ as Markdown and JSON.

Every figure is a whole operation as an operator sees it: from the API request to the
operation's terminal state (wall), and the worker's own started->finished time (server).
Each is repeated; we report median, min and max with the repeat count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.exports import bench_exports  # noqa: E402
from bench.frozen import bench_frozen, bench_migration_delta  # noqa: E402
from bench.snapstore import bench_snapshot_store, bench_snapshot_store_btrfs  # noqa: E402
from lab import core  # noqa: E402
from tests.support.stack import Api, SSHServer, Stack  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


def add_prediction(row: dict, actual: list[float], predicted: list[float]) -> None:
    """The predicted column: the median prediction, and each run's error against its own
    measurement (median and worst, in %), all predictions made before their migration ran."""
    errors = [(p - a) / a * 100 for p, a in zip(predicted, actual, strict=False) if a]
    row["predicted"] = round(statistics.median(predicted), 1)
    if errors:
        row["error_pct"] = round(statistics.median(errors), 1)
        row["worst_error_pct"] = round(max(errors, key=abs), 1)


def op_ms(api: Api, method: str, path: str, body=None) -> tuple[float, float, dict]:
    t0 = time.monotonic()
    r = api(method, path, json=body) if body is not None else api(method, path)
    r.raise_for_status()
    op = api.wait_operation(r.json()["id"], timeout=300, interval=0.02)  # as soon as a websocket would say
    wall = (time.monotonic() - t0) * 1000
    if op["status"] != "success":
        raise RuntimeError(f"{method} {path} failed: {op['error']}")
    started = datetime.fromisoformat(op["started_at"])
    finished = datetime.fromisoformat(op["finished_at"])
    return wall, (finished - started).total_seconds() * 1000, op


def bench_lab(repeat: int) -> dict:
    """`lab up` from the cache and `lab down`, timed as whole commands."""
    py = str(ROOT / ".venv" / "bin" / "python")
    ups, downs = [], []
    for _ in range(repeat):
        t0 = time.monotonic()
        subprocess.run([py, "-m", "lab", "up"], cwd=ROOT, check=True, capture_output=True)
        ups.append((time.monotonic() - t0) * 1000)
        t0 = time.monotonic()
        subprocess.run([py, "-m", "lab", "down"], cwd=ROOT, check=True, capture_output=True)
        downs.append((time.monotonic() - t0) * 1000)
    return {"lab up (from cache), ms": summary(ups), "lab down, ms": summary(downs)}


LIFECYCLE = "container lifecycle on the lab"


def bench_lifecycle(stack: Stack, repeat: int) -> dict:
    api = Api(stack, stack.tokens["bob"])
    rows: dict[str, list[float]] = {}

    def add(label, wall, server):
        rows.setdefault(f"{label} (wall), ms", []).append(wall)
        rows.setdefault(f"{label} (worker), ms", []).append(server)

    for i in range(repeat):
        name = f"bench{i}"
        body = {"name": name, "host": "lab-a", "template": "busybox", "command": ["sleep", "100000"]}
        wall, server, _ = op_ms(api, "POST", "/api/v1/containers/", body)
        add("busybox create+start", wall, server)
        wall, server, _ = op_ms(api, "POST", f"/api/v1/containers/{name}/state", {"action": "stop"})
        add("busybox stop", wall, server)
        wall, server, _ = op_ms(api, "POST", f"/api/v1/containers/{name}/state", {"action": "start"})
        add("busybox start", wall, server)
        op_ms(api, "DELETE", f"/api/v1/containers/{name}/")
    return {k: summary(v) for k, v in rows.items()}


COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 1; done"


def bench_criu(stack: Stack, repeat: int) -> dict:
    """Stateful snapshot, restore and stop-and-copy migration of a busybox counter container."""
    api = Api(stack, stack.tokens["bob"])
    rows: dict[str, list[float]] = {}
    body = {"name": "benchc", "host": "lab-a", "template": "busybox", "command": ["sh", "-c", COUNTER]}
    op_ms(api, "POST", "/api/v1/containers/", body)
    host = "lab-a"
    try:
        for i in range(repeat):
            wall, _, op = op_ms(api, "POST", "/api/v1/containers/benchc/snapshots/", {"name": f"s{i}"})
            rows.setdefault("stateful snapshot (wall), ms", []).append(wall)
            rows.setdefault("  of which CRIU frozen_time, ms", []).append(op["result"]["stats"]["frozen_time"] / 1000)
            wall, _, op = op_ms(api, "POST", f"/api/v1/containers/benchc/snapshots/s{i}/restore")
            rows.setdefault("restore (wall), ms", []).append(wall)
            rows.setdefault("  of which CRIU restore_time, ms", []).append(op["result"]["stats"]["restore_time"] / 1000)
            target = "lab-b" if host == "lab-a" else "lab-a"
            wall, _, op = op_ms(
                api, "POST", "/api/v1/containers/benchc/migrate", {"target_host": target, "strategy": "stop-and-copy"}
            )
            host = target
            rows.setdefault("stop-and-copy migration total (wall), ms", []).append(wall)
            rows.setdefault("  downtime (freeze to running on target), ms", []).append(op["result"]["downtime_ms"])
            rows.setdefault("  bytes transferred, KiB", []).append(op["result"]["bytes_transferred"] / 1024)
    finally:
        op_ms(api, "DELETE", "/api/v1/containers/benchc/")
    return {k: summary(v) for k, v in rows.items()}


def bench_concurrency(stack: Stack) -> dict:
    """8 operations at once across the two lab hosts: each one's wait for a worker, and its run."""
    import concurrent.futures

    api = Api(stack, stack.tokens["bob"])
    names = [f"conc{i}" for i in range(8)]

    def create(i):
        body = {"name": names[i], "host": "lab-a" if i % 2 else "lab-b", "command": ["sleep", "100000"]}
        r = api.post("/api/v1/containers/", json=body)
        r.raise_for_status()
        return r.json()["id"]

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(create, range(8)))
    ops = [api.wait_operation(i, timeout=300) for i in ids]
    wall = (time.monotonic() - t0) * 1000
    waits, runs = [], []
    for op in ops:
        created = datetime.fromisoformat(op["created_at"])
        started = datetime.fromisoformat(op["started_at"])
        finished = datetime.fromisoformat(op["finished_at"])
        waits.append((started - created).total_seconds() * 1000)
        runs.append((finished - started).total_seconds() * 1000)
    ok = sum(op["status"] == "success" for op in ops)
    for name in names:
        try:
            op_ms(api, "DELETE", f"/api/v1/containers/{name}/")
        except Exception:
            pass
    return {
        f"8 creates at once ({ok}/8 succeeded): wait for a worker, ms": summary(waits),
        "  each one's own run, ms": summary(runs),
        "  all 8, wall, ms": summary([wall]),
    }


MEMORY_WORKLOAD = (
    "import hashlib, time\n"
    "n = {mib} << 20\n"
    "buf = bytearray(n)\n"
    "for i in range(0, n, 4096): buf[i] = 1\n"
    "i = 0\n"
    "while True:\n"
    "    for _ in range(256):\n"  # about 1 MiB/s of writes, spread over the buffer
    "        buf[(i * 4096) % n] = i & 255; i += 1\n"
    "    time.sleep(0.25)\n"
)


def bench_memory(stack: Stack, sizes=(16, 128, 512), repeat: int = 3) -> dict:
    """Downtime against resident memory, stop-and-copy and post-copy, beside the floor:
    image size over the copy rate measured in the same run, plus CRIU's freeze and restore."""
    from bench.byhand import Hosts, copy_rate

    api = Api(stack, stack.tokens["bob"])
    rows: dict[str, list[float]] = {}
    predicted: dict[str, list[float]] = {}  # result.prediction, made as each migration started
    # The copy bandwidth between the two hosts in this run: 256 MiB through this machine
    # with OpenSSH (the path an operator's own copy takes), bytes per ms.
    rates = [copy_rate(Hosts(stack), "lab-a", "lab-b", 256) for _ in range(3)]
    rows["copy bandwidth lab-a -> lab-b (OpenSSH via this machine, 256 MiB), MiB/s"] = [r * 1000 / 2**20 for r in rates]
    rate = statistics.median(rates)
    for mib in sizes:
        name = f"mem{mib}"
        cmd = ["python3", "-c", MEMORY_WORKLOAD.format(mib=mib)]
        op_ms(api, "POST", "/api/v1/containers/", {"name": name, "host": "lab-a", "template": "debian", "command": cmd})
        time.sleep(2 + mib / 128)  # let it touch its memory
        host = "lab-a"
        try:
            for _ in range(repeat):
                for strategy in ("stop-and-copy", "post-copy"):
                    target = "lab-b" if host == "lab-a" else "lab-a"
                    _, _, op = op_ms(
                        api, "POST", f"/api/v1/containers/{name}/migrate", {"target_host": target, "strategy": strategy}
                    )
                    host = target
                    res = op["result"]
                    rows.setdefault(f"{strategy} downtime at {mib} MiB, ms", []).append(res["downtime_ms"])
                    rows.setdefault(f"{strategy} total at {mib} MiB, ms", []).append(res["total_ms"])
                    made = res.get("prediction") or {}
                    for what, key in (("downtime", "predicted_downtime_ms"), ("total", "predicted_total_ms")):
                        if made.get(key) is not None:
                            predicted.setdefault(f"{strategy} {what} at {mib} MiB, ms", []).append(made[key])
                    if strategy == "stop-and-copy":
                        images = (res["dump_stats"].get("pages_written") or 0) * 4096
                        floor = (
                            images / rate
                            + res["dump_stats"].get("frozen_time", 0) / 1000
                            + res["restore_stats"].get("restore_time", 0) / 1000
                        )
                        rows.setdefault(
                            f"physical floor at {mib} MiB (images/copy rate + CRIU freeze + restore), ms", []
                        ).append(floor)
        finally:
            op_ms(api, "DELETE", f"/api/v1/containers/{name}/")
    out = {k: summary(v) for k, v in rows.items()}
    for k, v in predicted.items():
        add_prediction(out[k], rows[k], v)
    small, big = (
        out.get(f"post-copy downtime at {sizes[0]} MiB, ms"),
        out.get(f"post-copy downtime at {sizes[-1]} MiB, ms"),
    )
    if small and big:
        out[f"post-copy downtime {sizes[-1]} MiB / {sizes[0]} MiB (target: within 1.5x)"] = {
            "n": 1,
            "median": round(big["median"] / small["median"], 2),
            "min": 0,
            "max": 0,
        }
    return out


MEMORY = "downtime against memory size (debian, python writing ~1 MiB/s)"
PAGES = "post-copy page pull rate (debian, python holding 256 MiB)"


def bench_pages(stack: Stack, mib: int = 256, repeat: int = 3) -> dict:
    """How fast a post-copy's pages reach the target: the bytes the page path carried over
    the time from the restore to the last page (result.page_bytes / result.pages_ms)."""
    api = Api(stack, stack.tokens["bob"])
    name = f"pages{mib}"
    cmd = ["python3", "-c", MEMORY_WORKLOAD.format(mib=mib)]
    op_ms(api, "POST", "/api/v1/containers/", {"name": name, "host": "lab-a", "template": "debian", "command": cmd})
    time.sleep(2 + mib / 128)
    rows: dict[str, list[float]] = {}
    host = "lab-a"
    try:
        for _ in range(repeat):
            target = "lab-b" if host == "lab-a" else "lab-a"
            _, _, op = op_ms(
                api, "POST", f"/api/v1/containers/{name}/migrate", {"target_host": target, "strategy": "post-copy"}
            )
            assert op["status"] == "success", op["error"]
            host = target
            res = op["result"]
            rows.setdefault("page bytes pulled, MiB", []).append(res["page_bytes"] / 2**20)
            rows.setdefault("page pull time, ms", []).append(res["pages_ms"])
            rows.setdefault("page pull rate, MiB/s", []).append(res["page_bytes"] / 2**20 / (res["pages_ms"] / 1000))
            rows.setdefault("downtime, ms", []).append(res["downtime_ms"])
    finally:
        op_ms(api, "DELETE", f"/api/v1/containers/{name}/")
    return {k: summary(v) for k, v in rows.items()}


DIRECT = "stop-and-copy relayed over SSH vs direct TLS (debian, python holding 512 MiB)"


def bench_direct(stack: Stack, mib: int = 512, repeat: int = 3) -> dict:
    """The same container moved back and forth with stop-and-copy, alternately relayed by the
    dashboard over SSH (the default) and sent directly between the hosts (an admin allowed the
    lab's network). Same run, same container, interleaved so drift hits both alike."""
    api, admin = Api(stack, stack.tokens["bob"]), Api(stack, stack.tokens["alice"])
    name = f"direct{mib}"
    cmd = ["python3", "-c", MEMORY_WORKLOAD.format(mib=mib)]
    op_ms(api, "POST", "/api/v1/containers/", {"name": name, "host": "lab-a", "template": "debian", "command": cmd})
    time.sleep(2 + mib / 128)  # let it touch its memory
    rows: dict[str, list[float]] = {}
    host = "lab-a"
    try:
        for _ in range(repeat):
            for mode, networks in (("relayed over SSH", []), ("direct TLS", [str(core.subnet())])):
                admin("PUT", "/api/v1/settings/", json={"direct_transfer_networks": networks}).raise_for_status()
                target = "lab-b" if host == "lab-a" else "lab-a"
                _, _, op = op_ms(
                    api,
                    "POST",
                    f"/api/v1/containers/{name}/migrate",
                    {"target_host": target, "strategy": "stop-and-copy"},
                )
                host = target
                res = op["result"]
                want = "direct-tls" if networks else "ssh-relay"
                if res["transfer"]["images"] != want:
                    raise RuntimeError(f"expected {want}, the result says {res['transfer']}")
                rows.setdefault(f"downtime, {mode}, ms", []).append(res["downtime_ms"])
                rows.setdefault(f"total, {mode}, ms", []).append(res["total_ms"])
                rows.setdefault(f"transfer phase (delta + images, container down), {mode}, ms", []).append(
                    res["phases"].get("transfer_ms", 0)
                )
                moved = res["bytes_transferred"] / 2**20
                secs = (res["phases"].get("presync_ms", 0) + res["phases"].get("transfer_ms", 0)) / 1000
                rows.setdefault(f"copy rate (all bytes / presync + transfer), {mode}, MiB/s", []).append(
                    moved / max(secs, 0.001)
                )
    finally:
        admin("PUT", "/api/v1/settings/", json={"direct_transfer_networks": []})
        op_ms(api, "DELETE", f"/api/v1/containers/{name}/")
    out = {k: summary(v) for k, v in rows.items()}
    relay, direct = out.get("downtime, relayed over SSH, ms"), out.get("downtime, direct TLS, ms")
    if relay and direct:
        out["downtime direct / relayed (medians)"] = {
            "n": 1,
            "median": round(direct["median"] / relay["median"], 2),
            "min": 0,
            "max": 0,
        }
    return out


CLIENT = "client-visible downtime against an independent TCP client (debian, python echo service)"


def bench_client_downtime(stack: Stack, repeat: int = 10) -> dict:
    """Each migration's reported client-visible downtime (result.client_downtime_ms: the
    freeze on the source until the address answers on the target, measured by the agents)
    beside the longest gap an independent TCP client saw (tests/support/tcpgap.py, in this
    process, outside the product: 200 established connections, a request every 5 ms on the
    next idle one, spread to 3 % of the silence so far while none is answered). Target: each
    within 10 % or 30 ms of the client's gap."""
    from tests.support.rstwatch import RstWatch
    from tests.support.tcpgap import ECHO_SERVICE, GapClient

    api = Api(stack, stack.tokens["bob"])
    name = "seen"
    cmd = ["python3", "-c", ECHO_SERVICE]
    op_ms(api, "POST", "/api/v1/containers/", {"name": name, "host": "lab-a", "template": "debian", "command": cmd})
    ip = api.get(f"/api/v1/containers/{name}/").json()["ipv4"]
    client = lone = None
    for _ in range(100):
        try:
            client = GapClient(ip).start()
            break
        except OSError:
            time.sleep(0.2)
    if client is None:
        raise RuntimeError(f"the echo service at {ip} never answered")
    # Beside it, what one connection alone sees: its gap includes TCP's retransmission back-off.
    lone = GapClient(ip, connections=1).start()
    # Who resets a connection, if one is lost: every RST to or from the container, with its
    # sender's MAC and interface, printed with the migration it fell in.
    rsts = RstWatch.start_if_root(ip)
    lost_in: dict[str, int] = {"stop-and-copy": 0, "post-copy": 0}
    rows: dict[str, list[float]] = {}
    within: dict[str, list[bool]] = {}
    host = "lab-a"
    failed = ""
    try:
        for i in range(repeat * 2):
            strategy = ("stop-and-copy", "post-copy")[i % 2]
            target = "lab-b" if host == "lab-a" else "lab-a"
            t0 = time.monotonic()
            try:
                _, _, op = op_ms(
                    api, "POST", f"/api/v1/containers/{name}/migrate", {"target_host": target, "strategy": strategy}
                )
            except RuntimeError as e:  # what was measured stays; the note says where it stopped
                failed = f"stopped after {i}: {e}"[:200]
                break
            t1 = time.monotonic()
            time.sleep(0.3)  # the client's answers after the end are not in the window anyway
            lost = client.losses_between(t0, t1 + 0.3) + lone.losses_between(t0, t1 + 0.3)
            lost_in[strategy] += len(lost)
            reset = rsts.between(t0, t1 + 0.3) if rsts is not None else []
            if lost or reset:
                print(f"bench client {i} {strategy} {host}->{target}: lost {lost}; RSTs seen:", file=sys.stderr)
                for line in reset[:20]:
                    print("   ", line, file=sys.stderr)
            host = target
            res = op["result"]
            gap = client.longest_gap_ms(t0, t1)
            seen = res.get("client_downtime_ms")
            if seen is None:
                failed = f"stopped after {i}: no client-visible downtime: {res.get('client_downtime')}"[:200]
                break
            rows.setdefault(f"{strategy}: reported client-visible downtime, ms", []).append(seen)
            rows.setdefault(f"{strategy}: TCP client's longest gap, ms", []).append(gap)
            rows.setdefault(f"{strategy}: reported - client's gap, ms", []).append(seen - gap)
            rows.setdefault(f"{strategy}: one connection alone, its longest gap, ms", []).append(
                lone.longest_gap_ms(t0, t1)
            )
            rows.setdefault(f"{strategy}: downtime_ms (the source's dump begin to the restore's end), ms", []).append(
                res["downtime_ms"]
            )
            within.setdefault(strategy, []).append(abs(seen - gap) <= max(30, 0.1 * gap))
    finally:
        client.stop()
        lone.stop()
        if rsts is not None:
            rsts.stop()
        op_ms(api, "DELETE", f"/api/v1/containers/{name}/")
    out = {k: summary(v) for k, v in rows.items()}
    done = len(within.get("stop-and-copy", [])) + len(within.get("post-copy", []))
    out[f"migrations measured (of {repeat * 2}){'; ' + failed if failed else ''}"] = {
        "n": 1,
        "median": done,
        "min": 0,
        "max": 0,
    }
    why = sorted({f"{op}: {kind}" for _, op, kind in client.losses + lone.losses})
    out[f"TCP client's connections lost (closed or reset by the far end){': ' + ', '.join(why) if why else ''}"] = {
        "n": 1,
        "median": client.lost + lone.lost,
        "min": 0,
        "max": 0,
    }
    for strategy, n in lost_in.items():
        out[f"{strategy}: TCP client's connections lost during its migrations"] = {
            "n": 1,
            "median": n,
            "min": 0,
            "max": 0,
        }
    for strategy, oks in within.items():
        verdict = "met" if all(oks) else "MISSED"
        out[
            f"{strategy}: migrations within 10 % or 30 ms of the client's gap (median column: how many of n; target: all; {verdict})"
        ] = {
            "n": len(oks),
            "median": sum(oks),
            "min": 0,
            "max": 0,
        }
    return out


PATHS = "the paths of a migration's bytes (debian, python holding 256 MiB): rates and ratios in one run"

TCP_RECEIVE = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('{addr}', 5099)); s.listen(1); print('up', flush=True)\n"
    "c, _ = s.accept(); n = 0\n"
    "while d := c.recv(1 << 20):\n"
    "    n += len(d)\n"
    "print(n, flush=True)\n"
)
TCP_SEND = (
    "import socket\n"
    "s = socket.create_connection(('{addr}', 5099)); b = bytes(1 << 20)\n"
    "for _ in range({mib}):\n"
    "    s.sendall(b)\n"
    "s.close()\n"
)


def _listening(h, dst: str, code: str, *args: str) -> subprocess.Popen:
    """A python3 script on lab host `dst` (its stdout a pipe), once it printed that it listens."""
    argv = h.argv(dst, " ".join(["python3", "-c", shlex.quote(code), *map(shlex.quote, args)]))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    return proc


def tcp_rate(h, src: str, dst: str, mib: int = 1024) -> float:
    """Bytes per ms of a plain TCP stream from one lab host to the other (no encryption)."""
    addr = h.addr[dst]
    recv = _listening(h, dst, TCP_RECEIVE.format(addr=addr))
    try:
        t0 = time.monotonic()
        h.run(src, "python3 -c " + shlex.quote(TCP_SEND.format(addr=addr, mib=mib)))
        n = int(recv.stdout.readline())
        return n / ((time.monotonic() - t0) * 1000)
    finally:
        recv.wait(30)


TREE_RECEIVE = (
    "import socket, subprocess, sys\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('{addr}', 5098)); s.listen(1); print('up', flush=True)\n"
    "c, _ = s.accept()\n"
    "sys.exit(subprocess.run(['tar', '-C', sys.argv[1], '--numeric-owner', '-xf', '-'], stdin=c).returncode)\n"
)
TREE_SEND = (
    "import socket, sys\n"
    "s = socket.create_connection(('{addr}', 5098))\n"
    "while d := sys.stdin.buffer.read1(1 << 20):\n"
    "    s.sendall(d)\n"
    "s.close()\n"
)


def tree_copy_ms(h, src: str, dst: str, name: str, direct: bool) -> float:
    """A container's rootfs tree copied by hand, GNU tar at both ends, as an admin would: through
    this machine over OpenSSH (relayed), or over a plain TCP stream between the hosts (direct).
    The floor of a tree of thousands of small files, which a stream of one big file does not
    show: the receiving filesystem makes each file, directory and link."""
    d = "/var/lib/ctweb/byhand/tree"
    h.run(dst, f"rm -rf {d}; mkdir -p {d}")
    send = f"tar -C /var/lib/lxc/{name}/rootfs --numeric-owner -cf - ."
    try:
        if not direct:
            t0 = time.monotonic()
            h.pipe(src, send, dst, f"tar -C {d} --numeric-owner -xf -")
        else:
            addr = h.addr[dst]
            recv = _listening(h, dst, TREE_RECEIVE.format(addr=addr), d)
            t0 = time.monotonic()
            h.run(src, f"{send} | python3 -c " + shlex.quote(TREE_SEND.format(addr=addr)))
            if recv.wait(120) != 0:
                raise RuntimeError(f"the by-hand tree copy to {dst} failed")
        return (time.monotonic() - t0) * 1000
    finally:
        h.run(dst, f"rm -rf {d}")


def bench_paths(stack: Stack, mib: int = 256, repeat: int = 3) -> dict:
    """Issue 15: each path's rate against the plain copy rate of that path, measured in the
    same run, interleaved. Relayed: the dashboard's relay against a plain OpenSSH copy through
    this machine (`ssh a 'head -c' | ssh b 'cat'`); direct: against a plain TCP stream
    between the hosts. For each strategy and each setting, the migration's data that crossed
    the dashboard (result.dashboard_bytes)."""
    from bench.byhand import Hosts, copy_rate

    api, admin = Api(stack, stack.tokens["bob"]), Api(stack, stack.tokens["alice"])
    h = Hosts(stack)
    rows: dict[str, list[float]] = {}
    ssh_rates, tcp_rates = [], []
    name = f"paths{mib}"
    cmd = ["python3", "-c", MEMORY_WORKLOAD.format(mib=mib)]
    op_ms(api, "POST", "/api/v1/containers/", {"name": name, "host": "lab-a", "template": "debian", "command": cmd})
    time.sleep(2 + mib / 128)
    host = "lab-a"
    try:
        for _ in range(repeat):
            for mode, networks in (("relayed", []), ("direct", [str(core.subnet())])):  # this lab instance's
                admin("PUT", "/api/v1/settings/", json={"direct_transfer_networks": networks}).raise_for_status()
                for strategy in ("stop-and-copy", "post-copy"):
                    target = "lab-b" if host == "lab-a" else "lab-a"
                    # The plain copy rates of both paths, just before, in the same direction.
                    ssh_rates.append(copy_rate(h, host, target, 256))
                    tcp_rates.append(tcp_rate(h, host, target))
                    by_hand_tree = tree_copy_ms(h, host, target, name, direct=bool(networks))
                    _, _, op = op_ms(
                        api, "POST", f"/api/v1/containers/{name}/migrate", {"target_host": target, "strategy": strategy}
                    )
                    host = target
                    res = op["result"]
                    went = (res.get("transfer") or {}).get("images")
                    if went != ("ssh-relay" if mode == "relayed" else "direct-tls"):  # a wrong figure, not a slow one
                        raise RuntimeError(f"{strategy} {mode}: the images went {went!r}")
                    plain = ssh_rates[-1] if mode == "relayed" else tcp_rates[-1]  # bytes per ms
                    rows.setdefault(f"data through the dashboard, {strategy}, {mode}, MiB", []).append(
                        res["dashboard_bytes"] / 2**20
                    )
                    presync = res["presync_bytes"] / max(res["phases"].get("presync_ms", 0), 0.001)
                    rows.setdefault(f"rootfs presync rate, {mode}, MiB/s", []).append(presync * 1000 / 2**20)
                    rows.setdefault(f"rootfs presync rate / plain copy rate, {mode} (target: >= 0.7)", []).append(
                        presync / plain
                    )
                    # The same tree by hand (GNU tar both ends, same path, just before): the same
                    # bytes, so the ratio of the rates is the ratio of the times.
                    rows.setdefault(f"rootfs tree copied by hand (GNU tar both ends), {mode}, ms", []).append(
                        by_hand_tree
                    )
                    rows.setdefault(f"rootfs presync, {mode}, ms", []).append(res["phases"].get("presync_ms", 0))
                    rows.setdefault(
                        f"rootfs presync rate / the same tree copied by hand, {mode} (target: >= 0.7)", []
                    ).append(by_hand_tree / max(res["phases"].get("presync_ms", 0), 0.001))
                    if strategy == "stop-and-copy":
                        images = (res["dump_stats"].get("pages_written") or 0) * 4096
                        floor = (
                            images / plain
                            + res["dump_stats"].get("frozen_time", 0) / 1000
                            + res["restore_stats"].get("restore_time", 0) / 1000
                        )
                        target_x = 1.3 if mode == "relayed" else 1.2
                        rows.setdefault(f"stop-and-copy downtime, {mode}, ms", []).append(res["downtime_ms"])
                        rows.setdefault(
                            f"  its floor (images / plain copy rate + freeze + restore), {mode}, ms", []
                        ).append(floor)
                        rows.setdefault(f"  downtime / floor, {mode} (target: <= {target_x})", []).append(
                            res["downtime_ms"] / floor
                        )
                    else:
                        # Relayed: through the worker's pump over SSH; direct: between the hosts'
                        # page relays over TLS (the result says which path the pages took).
                        want = "direct-tls" if networks else "ssh-relay"
                        if res["page_relay"]["path"] != want:
                            raise RuntimeError(f"expected pages over {want}, the result says {res['transfer']}")
                        rate = res["page_bytes"] / max(res["pages_ms"] or 0, 0.001)
                        rows.setdefault(f"post-copy page pull rate, {mode}, MiB/s", []).append(rate * 1000 / 2**20)
                        if mode == "relayed":
                            rows.setdefault(
                                "post-copy page pull rate / plain OpenSSH copy rate (target: >= 0.7)", []
                            ).append(rate / ssh_rates[-1])
                        else:
                            rows.setdefault(
                                "post-copy page pull rate / plain TCP stream rate (target: >= 0.5)", []
                            ).append(rate / tcp_rates[-1])
                        rows.setdefault(f"post-copy downtime, {mode}, ms", []).append(res["downtime_ms"])
    finally:
        admin("PUT", "/api/v1/settings/", json={"direct_transfer_networks": []})
        op_ms(api, "DELETE", f"/api/v1/containers/{name}/")
    out = {
        "plain OpenSSH copy through this machine (256 MiB), MiB/s": summary([r * 1000 / 2**20 for r in ssh_rates]),
        "plain TCP stream host to host (1 GiB), MiB/s": summary([r * 1000 / 2**20 for r in tcp_rates]),
    }
    for k, v in rows.items():
        s = summary(v)
        if "target" in k:  # a ratio: two decimals
            s = {**s, "median": round(statistics.median(v), 2), "min": round(min(v), 2), "max": round(max(v), 2)}
        out[k] = s
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def bench_progress_latency(stack: Stack, want: int = 200) -> dict:
    """From the agent printing an event (its clock) to a websocket client receiving it.

    Probes of real SSH hosts (an OpenSSH server on loopback) produce the events; the client
    listens on /ws/events/ like a browser's header does. Same machine, so one clock."""
    import asyncio

    import websockets

    sshd = SSHServer(stack.dashboard_public_key()).start()
    admin = Api(stack, stack.tokens["alice"])
    names = [f"lat{i}" for i in range(8)]
    for name in names:
        admin.post("/api/v1/hosts/", json={"name": name, "address": "127.0.0.1", "port": sshd.port})
        admin.post(f"/api/v1/hosts/{name}/trust", json={"fingerprint": sshd.fingerprint()})
    latencies: list[float] = []

    async def listen(done: asyncio.Event):
        headers = {"Authorization": f"Token {stack.tokens['carol']}"}
        async with websockets.connect(admin.ws_url("/ws/events/"), additional_headers=headers) as ws:
            while not done.is_set():
                try:
                    raw = await asyncio.wait_for(ws.recv(), 1)
                except TimeoutError:
                    continue
                event = json.loads(raw).get("event") or {}
                if "agent_t" in event:
                    latencies.append((time.time() - event["agent_t"]) * 1000)

    async def main():
        done = asyncio.Event()
        listener = asyncio.create_task(listen(done))
        await asyncio.sleep(0.5)
        while len(latencies) < want:
            ids = await asyncio.to_thread(lambda: [admin.post(f"/api/v1/hosts/{n}/probe").json()["id"] for n in names])
            for op_id in ids:
                await asyncio.to_thread(admin.wait_operation, op_id, 120)
        await asyncio.sleep(0.5)
        done.set()
        await listener

    try:
        asyncio.run(main())
    finally:
        sshd.cleanup()
    return {
        "agent event to websocket client, ms": {
            "n": len(latencies),
            "median": round(statistics.median(latencies), 1),
            "min": round(min(latencies), 1),
            "max": round(max(latencies), 1),
            "p95": round(percentile(latencies, 95), 1),
        }
    }


def bench_fleet() -> tuple[str, str, dict]:
    """Fleet scale on PostgreSQL: bench/fleet.py in its own process (it picks its own database)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, str(ROOT / "bench" / "fleet.py"), "--json", f.name], cwd=ROOT, check=True)
        out = json.loads(Path(f.name).read_text())
    return out["section"], out["note"], out["rows"]


def write(results: dict, notes: dict | None = None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.release()}, {subprocess.check_output(['nproc']).decode().strip()} cores, load {load} at the end",
    }
    # A partial run (--no-lab) updates its own sections and keeps the others, each with its date.
    previous = {}
    if (RESULTS / "latest.json").exists():
        previous = json.loads((RESULTS / "latest.json").read_text())
    sections = previous.get("sections", {})
    for section, rows in results.items():
        sections[section] = {"when": meta["when"], "machine": meta["machine"], "rows": rows}
        if notes and section in notes:
            sections[section]["note"] = notes[section]
    (RESULTS / "latest.json").write_text(json.dumps({"sections": sections}, indent=1) + "\n")
    lines = ["# ctweb benchmark", "", "Each section says when and where it was measured (`make bench`).", ""]
    for section, entry in sections.items():
        rows = entry["rows"]
        queries = any("queries" in s for s in rows.values())  # fleet scale: SQL per request, all rows / few
        predicted = any("predicted" in s for s in rows.values())  # the migrations' own predictions
        lines += [f"## {section}", "", f"{entry['when']}, {entry['machine']}", ""]
        if entry.get("note"):
            lines += [entry["note"], ""]
        lines += [
            "| measure | n | median | p95 | min | max |"
            + (" SQL queries (all rows / 1/20) |" if queries else "")
            + (" predicted (median) | error, median / worst (%) |" if predicted else ""),
            "| --- | ---: | ---: | ---: | ---: | ---: |"
            + (" ---: |" if queries else "")
            + (" ---: | ---: |" if predicted else ""),
        ]
        for label, s in rows.items():
            line = f"| {label} | {s['n']} | {s['median']} | {s.get('p95', '')} | {s['min']} | {s['max']} |"
            if queries:
                line += f" {s.get('queries', '')} / {s.get('queries_small', '')} |"
            if predicted:
                off = f"{s['error_pct']:+} / {s['worst_error_pct']:+}" if "error_pct" in s else ""
                line += f" {s.get('predicted', '')} | {off} |"
            lines.append(line)
        lines.append("")
    (RESULTS / "latest.md").write_text("\n".join(lines))
    print("\n".join(lines))


BY_HAND = "overhead against doing it by hand (busybox, 64 MiB held in memory)"
SNAPSTORE = "snapshot storage: disk per snapshot and frozen time against rootfs size, beside by hand (debian)"
EXPORTS = "export and import throughput (debian, 128 MiB in memory, stateful snapshot)"
SNAPSTORE_BTRFS = "snapshot storage on btrfs: disk per snapshot by the filesystem's count, frozen time (debian, lab-b)"
FROZEN = "frozen time of a stateful snapshot against rootfs size: 185 MiB against 2 GiB in 100,000 files (debian; change journal against the full walk)"

MIGRATION_DELTA = "a migration's rootfs delta while down against rootfs size: 185 MiB against 2 GiB in 100,000 files (debian, stop-and-copy; change journal against the full walk)"


def frozen_section(stack: Stack, notes: dict) -> dict:
    rows, notes[FROZEN] = bench_frozen(stack, op_ms)
    return rows


def migration_delta_section(stack: Stack, notes: dict) -> dict:
    rows, notes[MIGRATION_DELTA] = bench_migration_delta(stack, op_ms)
    return rows


def by_hand_section(stack: Stack, repeat: int) -> dict:
    """ctweb against the same steps typed by hand, same containers, same run (bench/byhand.py)."""
    from bench.byhand import bench_by_hand

    raw = bench_by_hand(stack, repeat, op_ms)
    out = {f"{k}, ms": summary(v) for k, v in raw.items()}
    for what, target in (("downtime", 1.10), ("total", 1.25)):
        for op in ("snapshot", "restore", "stop-and-copy"):
            ours, theirs = raw.get(f"{op} {what}, ctweb"), raw.get(f"{op} {what}, by hand")
            if ours and theirs:
                ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
                s = {
                    "n": len(ratios),
                    "median": round(statistics.median(ratios), 2),
                    "min": round(min(ratios), 2),
                    "max": round(max(ratios), 2),
                }
                verdict = "met" if s["median"] <= target else "MISSED"
                out[f"{op} {what} ctweb / by hand, per pair (target: within {target}x; {verdict})"] = s
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-lab", action="store_true", help="only what needs no lab (fleet scale, progress latency)")
    ap.add_argument(
        "--only",
        help="run only these parts (comma-separated): fleet (no lab), lifecycle, client, concurrency, memory, byhand, direct, pages, paths, snapstore, frozen, migration-delta, exports or snapstore-btrfs (with the lab; the last needs CTWEB_LAB_BTRFS=lab-b)",
    )
    args = ap.parse_args()
    results, notes = {}, {}
    if args.only in (None, "fleet"):
        section, notes[section], results[section] = bench_fleet()
    if args.only == "fleet":
        write(results, notes)
        return 0
    if not args.no_lab:
        import fcntl

        # One session per lab instance: wait for a test run (or another bench) that has it.
        lab_lock = open(core.LOCK_PATH, "w")
        fcntl.flock(lab_lock, fcntl.LOCK_EX)
    if not args.no_lab and not args.only:
        results["lab"] = bench_lab(args.repeat)
    stack = Stack(concurrency=8).start()  # as the Procfile runs it
    try:
        stack.tokens = stack.make_users()
        if not args.only:
            results["progress latency (target: p95 under 100 ms)"] = bench_progress_latency(stack)
        if args.only:
            stack.manage("lab", "up")
            parts = {
                "lifecycle": (LIFECYCLE, lambda st: bench_lifecycle(st, args.repeat)),
                "client": (CLIENT, bench_client_downtime),
                "concurrency": ("concurrency on the lab", bench_concurrency),
                "memory": (MEMORY, bench_memory),
                "byhand": (BY_HAND, lambda st: by_hand_section(st, args.repeat)),
                "direct": (DIRECT, bench_direct),
                "pages": (PAGES, bench_pages),
                "paths": (PATHS, bench_paths),
                "snapstore": (SNAPSTORE, lambda st: bench_snapshot_store(st, op_ms)),
                "snapstore-btrfs": (SNAPSTORE_BTRFS, lambda st: bench_snapshot_store_btrfs(st, op_ms)),
                "frozen": (FROZEN, lambda st: frozen_section(st, notes)),
                "migration-delta": (MIGRATION_DELTA, lambda st: migration_delta_section(st, notes)),
                "exports": (EXPORTS, lambda st: bench_exports(st, op_ms)),
            }
            for only in args.only.split(","):  # several parts in one run: --only lifecycle,client
                section, run = parts[only]
                try:
                    results[section] = run(stack)
                    if not results[section]:  # a part with nothing to measure here (no btrfs host)
                        print(f"bench part {only}: skipped (lab-b is not on btrfs: CTWEB_LAB_BTRFS=lab-b)")
                        del results[section]
                except Exception as e:  # the parts measured so far are kept; this one is reported
                    after = f" (while cleaning up after {e.__context__!r})" if e.__context__ else ""
                    print(f"bench part {only} failed: {e!r}{after}", file=sys.stderr)
        elif not args.no_lab:
            stack.manage("lab", "up")
            results[LIFECYCLE] = bench_lifecycle(stack, args.repeat)
            results["CRIU operations on the lab (busybox counter, snapshots accumulate)"] = bench_criu(
                stack, args.repeat
            )
            results[BY_HAND] = by_hand_section(stack, args.repeat)
            results[MEMORY] = bench_memory(stack)
            results[DIRECT] = bench_direct(stack)
            results[CLIENT] = bench_client_downtime(stack)
            results[PATHS] = bench_paths(stack)
            results[SNAPSTORE] = bench_snapshot_store(stack, op_ms)
            results[FROZEN] = frozen_section(stack, notes)
            results[MIGRATION_DELTA] = migration_delta_section(stack, notes)
            results[EXPORTS] = bench_exports(stack, op_ms)
            btrfs = bench_snapshot_store_btrfs(stack, op_ms)  # {} unless the lab came up with CTWEB_LAB_BTRFS=lab-b
            if btrfs:
                results[SNAPSTORE_BTRFS] = btrfs
    finally:
        stack.stop()
        subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "lab", "down"], cwd=ROOT, capture_output=True)
    write(results, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
