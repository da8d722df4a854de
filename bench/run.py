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

from tests.stack import Api, Stack  # noqa: E402

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


def write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.release()}, {subprocess.check_output(['nproc']).decode().strip()} cores",
    }
    (RESULTS / "latest.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    lines = [f"# ctweb benchmark ({meta['when']})", "", f"Machine: {meta['machine']}", ""]
    for section, rows in results.items():
        lines += [f"## {section}", "", "| measure | n | median | min | max |", "| --- | ---: | ---: | ---: | ---: |"]
        for label, s in rows.items():
            lines.append(f"| {label} | {s['n']} | {s['median']} | {s['min']} | {s['max']} |")
        lines.append("")
    (RESULTS / "latest.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    results = {"lab": bench_lab(args.repeat)}
    stack = Stack().start()
    try:
        stack.tokens = stack.make_users()
        stack.manage("lab", "up")
        results["container lifecycle on the lab"] = bench_lifecycle(stack, args.repeat)
        results["CRIU operations on the lab (busybox counter, snapshots accumulate)"] = bench_criu(stack, args.repeat)
    finally:
        stack.stop()
        subprocess.run(
            [str(ROOT / ".venv" / "bin" / "python"), "-m", "hosts.lab", "down"], cwd=ROOT, capture_output=True
        )
    write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
