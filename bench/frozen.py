"""Frozen time of a stateful snapshot, and a migration's rootfs delta (sent while the container
is down), against the rootfs size (issue 16, item 2): the debian container as the template
makes it, then with 2 GiB more in 100,000 files written into its rootfs on the host (removed
afterwards).

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


def _grow(h: Hosts, host: str = HOST, rootfs: str = ROOTFS) -> None:
    h.run(
        host,
        "python3 -c "
        + shlex.quote(
            "import os\n"
            f"data = os.urandom({EXTRA_BYTES})\n"
            f"for i in range({EXTRA_FILES}):\n"
            f"    d = '{rootfs}/srv/extra/%03d' % (i // 200)\n"
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


# --- a migration's rootfs delta (bench/run.py --only migration-delta) -------------------------
# For each size: MIG_REPEAT stop-and-copy migrations back and forth between lab-a and lab-b with
# the source's change journal (hosts/agent/ctweb_agent/mjournal.py), then MIG_REPEAT with it
# turned off (the worker restarted with CTWEB_MIGRATION_JOURNAL=0: the delta walks the whole
# rootfs, as before and as the fallback does). Measured: result.rootfs_delta.ms, the delta's
# transfer on the worker's clock while the container is down (listing it on the source, sending
# it, putting it in place on the target), its list_ms (the source's listing alone), and the
# migration's downtime_ms. The target: the 2 GiB rootfs's delta within 1.2 x the template's.

MIG_NAME = "deltadeb"
MIG_ROOTFS = f"/var/lib/lxc/{MIG_NAME}/rootfs"
MIG_REPEAT = 3
MIG_TIMEOUT_S = 900  # a 2.5 GiB presync on a loaded 2-core machine


def _worker(stack: Stack, journal: bool) -> None:
    """The worker again, with the migration's change journal on or off."""
    stack.procs["worker"].stop()
    stack.env["CTWEB_MIGRATION_JOURNAL"] = "1" if journal else "0"
    stack.start_worker()


def bench_migration_delta(stack: Stack, op_ms) -> tuple[dict, str]:
    api = Api(stack, stack.tokens["bob"])
    h = Hosts(stack)
    _create(
        api, op_ms, {"name": MIG_NAME, "host": "lab-a", "template": "debian", "command": ["python3", "-c", MEMCHECK]}
    )
    time.sleep(3)
    where = ["lab-a"]
    rows: dict[str, list[float]] = {}
    kinds: list[str] = []
    medians: dict[tuple[str, str], float] = {}

    def migrate(size: str) -> dict:
        target = "lab-b" if where[0] == "lab-a" else "lab-a"
        body = {"target_host": target, "strategy": "stop-and-copy"}
        r = api("POST", f"/api/v1/containers/{MIG_NAME}/migrate", json=body)
        r.raise_for_status()
        op = api.wait_operation(r.json()["id"], timeout=MIG_TIMEOUT_S, interval=0.2)
        if op["status"] != "success":
            raise RuntimeError(f"migration to {target} failed: {op['error']}")
        where[0] = target
        res = op["result"]
        d = res.get("rootfs_delta") or {}
        kinds.append(
            f"{size}: {d.get('pass')}"
            + (f" ({d.get('paths')} paths)" if d.get("pass") == "journal" else "")
            + (f" ({d.get('reason')})" if d.get("reason") else "")
        )
        return res

    try:
        for size in ("template", "grown"):
            if size == "grown":
                t0 = time.monotonic()
                _grow(h, where[0], MIG_ROOTFS)
                print(f"grew the rootfs in {time.monotonic() - t0:.0f} s")
            mib = _du(h, where[0], MIG_ROOTFS) / 2**20
            files = int(h.run(where[0], f"find {MIG_ROOTFS} -xdev | wc -l").strip())
            label = f"rootfs {mib:.0f} MiB, {files} entries"
            for mode in ("journal", "walk"):
                if mode == "walk":
                    _worker(stack, journal=False)
                delta, listed, down = [], [], []
                try:
                    for _ in range(MIG_REPEAT):
                        res = migrate(size)
                        delta.append(res["rootfs_delta"]["ms"])
                        listed.append(res["rootfs_delta"]["list_ms"] or 0)
                        down.append(res["downtime_ms"])
                finally:
                    if mode == "walk":
                        _worker(stack, journal=True)
                what = "change journal" if mode == "journal" else "full walk (journal off)"
                rows[f"{label}: rootfs delta while down, {what}, ms"] = delta
                rows[f"{label}: of which listing it on the source, {what}, ms"] = listed
                rows[f"{label}: stop-and-copy downtime, {what}, ms"] = down
                medians[(size, mode)] = statistics.median(delta)
    finally:
        try:
            h.run(where[0], f"rm -rf {MIG_ROOTFS}/srv/extra")
        finally:
            op_ms(api, "DELETE", f"/api/v1/containers/{MIG_NAME}/")
    out = {
        k: {"n": len(v), "median": round(statistics.median(v), 1), "min": min(v), "max": max(v)}
        for k, v in rows.items()
    }
    for mode, what in (("journal", "change journal"), ("walk", "full walk")):
        if ("grown", mode) in medians:
            ratio = medians[("grown", mode)] / medians[("template", mode)]
            verdict = "met" if ratio <= 1.2 else "MISSED"
            label = f"rootfs delta 2 GiB / template, medians, {what} (target <= 1.2; {verdict})"
            out[label] = {"n": 1, "median": round(ratio, 2), "min": round(ratio, 2), "max": round(ratio, 2)}
    note = "Delta listed by (result.rootfs_delta.pass): " + "; ".join(kinds) + "."
    return out, note
