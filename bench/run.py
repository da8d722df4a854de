"""`make bench`: measurements on the real lab, written to bench/results/ as Markdown and JSON.

Every figure is a whole operation as an operator sees it: from the API request to the
operation's terminal state (wall), and the worker's own started->finished time (server).
Each is repeated; we report median, min and max with the repeat count.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.stack import Api, SSHServer, Stack  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


def op_ms(api: Api, method: str, path: str, body=None) -> tuple[float, float, dict]:
    t0 = time.monotonic()
    r = api(method, path, json=body) if body is not None else api(method, path)
    r.raise_for_status()
    op = api.wait_operation(r.json()["id"], timeout=300)
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
        subprocess.run([py, "-m", "hosts.lab", "up"], cwd=ROOT, check=True, capture_output=True)
        ups.append((time.monotonic() - t0) * 1000)
        t0 = time.monotonic()
        subprocess.run([py, "-m", "hosts.lab", "down"], cwd=ROOT, check=True, capture_output=True)
        downs.append((time.monotonic() - t0) * 1000)
    return {"lab up (from cache), ms": summary(ups), "lab down, ms": summary(downs)}


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


def write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.release()}, {subprocess.check_output(['nproc']).decode().strip()} cores",
    }
    # A partial run (--no-lab) updates its own sections and keeps the others, each with its date.
    previous = {}
    if (RESULTS / "latest.json").exists():
        previous = json.loads((RESULTS / "latest.json").read_text())
    sections = previous.get("sections", {})
    for section, rows in results.items():
        sections[section] = {"when": meta["when"], "machine": meta["machine"], "rows": rows}
    (RESULTS / "latest.json").write_text(json.dumps({"sections": sections}, indent=1) + "\n")
    lines = ["# ctweb benchmark", "", "Each section says when and where it was measured (`make bench`).", ""]
    for section, entry in sections.items():
        rows = entry["rows"]
        lines += [
            f"## {section}",
            "",
            f"{entry['when']}, {entry['machine']}",
            "",
            "| measure | n | median | p95 | min | max |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for label, s in rows.items():
            lines.append(f"| {label} | {s['n']} | {s['median']} | {s.get('p95', '')} | {s['min']} | {s['max']} |")
        lines.append("")
    (RESULTS / "latest.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-lab", action="store_true", help="only what needs no lab (progress latency)")
    args = ap.parse_args()
    results = {} if args.no_lab else {"lab": bench_lab(args.repeat)}
    stack = Stack().start()
    try:
        stack.tokens = stack.make_users()
        results["progress latency (target: p95 under 100 ms)"] = bench_progress_latency(stack)
        if not args.no_lab:
            stack.manage("lab", "up")
            results["container lifecycle on the lab"] = bench_lifecycle(stack, args.repeat)
            results["CRIU operations on the lab (busybox counter, snapshots accumulate)"] = bench_criu(
                stack, args.repeat
            )
    finally:
        stack.stop()
        subprocess.run(
            [str(ROOT / ".venv" / "bin" / "python"), "-m", "hosts.lab", "down"], cwd=ROOT, capture_output=True
        )
    write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
