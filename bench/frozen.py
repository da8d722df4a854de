"""Frozen time of a stateful snapshot against the rootfs size (issue 16, item 2): the debian
container as the template makes it, then with 2 GiB more in 100,000 files written into its
rootfs on the host (removed afterwards).

For each size: REPEAT stateful snapshots through the API (the frozen pass from the change
journal, hosts/agent/ctweb_agent/journal.py), then REPEAT with the journal turned off (the agent
called over SSH with journal=false: the frozen pass walks the whole rootfs, as before and as the
fallback does). Frozen: the agent's freeze-to-thaw (CRIU's dump plus the frozen copy); the
frozen copy alone is reported too. The target: the 2 GiB rootfs's frozen time within 1.2 x the
template's. The container holds 32 MiB of a pattern in memory, checked every second.
"""

from __future__ import annotations

import json
import shlex
import statistics
import time

from bench.byhand import Hosts
from bench.snapstore import MEMCHECK, _create, _du
from hosts.agent import agent_file_name
from tests.support.stack import Api, Stack

NAME = "frozendeb"
HOST = "lab-a"
EXTRA_FILES = 100_000
EXTRA_BYTES = (2 << 30) // EXTRA_FILES  # 2 GiB in all
REPEAT = 5
ROOTFS = f"/var/lib/lxc/{NAME}/rootfs"


def _grow(h: Hosts) -> None:
    h.run(
        HOST,
        "python3 -c "
        + shlex.quote(
            "import os\n"
            f"data = os.urandom({EXTRA_BYTES})\n"
            f"for i in range({EXTRA_FILES}):\n"
            f"    d = '{ROOTFS}/srv/extra/%03d' % (i // 200)\n"
            "    if i % 200 == 0: os.makedirs(d, exist_ok=True)\n"
            "    with open('%s/f%d' % (d, i), 'wb') as f:\n"
            "        f.write(data[i % 97:] + data[: i % 97])\n"
        ),
    )


def _agent_snapshot(h: Hosts, snap: str) -> dict:
    """The agent's snapshot over SSH with the journal turned off; its result."""
    params = json.dumps({"name": NAME, "snapshot": snap, "stateful": True, "journal": False})
    out = h.run(HOST, f"echo {shlex.quote(params)} | python3 /var/lib/ctweb/agent/{agent_file_name()} snapshot")
    last = json.loads(out.strip().splitlines()[-1])
    if last.get("type") != "result":
        raise RuntimeError(f"snapshot {snap} failed: {last}")
    return last["data"]


def bench_frozen(stack: Stack, op_ms) -> tuple[dict, str]:
    api = Api(stack, stack.tokens["bob"])
    h = Hosts(stack)
    _create(api, op_ms, {"name": NAME, "host": HOST, "template": "debian", "command": ["python3", "-c", MEMCHECK]})
    time.sleep(3)
    rows: dict[str, list[float]] = {}
    kinds: list[str] = []
    medians = {}
    try:
        for size in ("template", "grown"):
            if size == "grown":
                t0 = time.monotonic()
                _grow(h)
                print(f"grew the rootfs in {time.monotonic() - t0:.0f} s")
            mib = _du(h, HOST, ROOTFS) / 2**20
            files = int(h.run(HOST, f"find {ROOTFS} -xdev | wc -l").strip())
            label = f"rootfs {mib:.0f} MiB, {files} entries"
            frozen, copy, walk, walk_copy = [], [], [], []
            for i in range(REPEAT):
                _, _, op = op_ms(api, "POST", f"/api/v1/containers/{NAME}/snapshots/", {"name": f"{size}j{i}"})
                stats = op["result"]["stats"]
                frozen.append(stats["frozen_ms"])
                copy.append(stats["frozen_copy_ms"])
                kinds.append(
                    f"{size}: {stats['frozen_pass']}"
                    + (f" ({stats['frozen_pass_paths']} paths)" if stats["frozen_pass"] == "journal" else "")
                    + (f" ({stats['frozen_pass_reason']})" if stats.get("frozen_pass_reason") else "")
                )
            for i in range(REPEAT):
                stats = _agent_snapshot(h, f"{size}w{i}")["stats"]
                walk.append(stats["frozen_ms"])
                walk_copy.append(stats["frozen_copy_ms"])
            rows[f"{label}: frozen, change journal, ms"] = frozen
            rows[f"{label}: of which the frozen copy, change journal, ms"] = copy
            rows[f"{label}: frozen, full walk (journal off), ms"] = walk
            rows[f"{label}: of which the frozen copy, full walk, ms"] = walk_copy
            medians[size] = (statistics.median(frozen), statistics.median(walk))
    finally:
        try:
            h.run(HOST, f"rm -rf {ROOTFS}/srv/extra")
        finally:
            op_ms(api, "DELETE", f"/api/v1/containers/{NAME}/")
            h.run(HOST, f"rm -rf /var/lib/ctweb/snapshots/{NAME}")
    out = {
        k: {"n": len(v), "median": round(statistics.median(v), 1), "min": min(v), "max": max(v)}
        for k, v in rows.items()
    }
    if "grown" in medians:
        for i, what in ((0, "change journal"), (1, "full walk")):
            ratio = medians["grown"][i] / medians["template"][i]
            verdict = "met" if ratio <= 1.2 else "MISSED"
            label = f"frozen 2 GiB / template, medians, {what} (target <= 1.2; {verdict})"
            out[label] = {"n": 1, "median": round(ratio, 2), "min": round(ratio, 2), "max": round(ratio, 2)}
    note = "Frozen pass used (stats.frozen_pass): " + "; ".join(kinds) + "."
    return out, note
