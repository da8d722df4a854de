"""Snapshot storage (issue 16): disk per snapshot (the 1st and the 10th) and the frozen time,
against the rootfs size, beside doing it by hand.

One debian container through ctweb, a twin by hand, both idle with 32 MiB of a pattern in
memory. For each rootfs size (the template's, then with EXTRA more in many small files
written into both rootfs directly on the host): ten stateful snapshots through the API (disk:
the API's added_bytes of the 1st and the 10th, and du of all ten on the host, each inode once; the
template's snapshots are deleted before the rootfs grows, so each size's 1st snapshot is whole;
frozen: the agent's freeze-to-thaw), then REPEAT_BY_HAND snapshots by hand as an operator
would type them (lxc-freeze, lxc-checkpoint, cp -a of the rootfs, lxc-unfreeze; frozen time
from the host's own clock; disk: du of one), each removed before the next. Then the ctweb
restore of the 10th (zstd images) beside the same snapshot with its images decompressed.
"""

from __future__ import annotations

import statistics
import time

from bench.byhand import WORK, Hosts, _ms_between
from tests.support.stack import Api, Stack

MEMCHECK = (
    "import hashlib, os, time\n"
    "buf = bytearray(bytes(range(256)) * 4096 * 32)\n"
    "while True:\n"
    "    open('/tmp/sum', 'w').write(hashlib.sha256(buf).hexdigest())\n"
    "    time.sleep(1)\n"
)
EXTRA_FILES, EXTRA_KIB = 20000, 24  # ~470 MiB in 20,000 files
REPEAT_BY_HAND = 3
SNAPS = "/var/lib/ctweb/snapshots"


def _du(h: Hosts, host: str, *paths: str) -> int:
    return int(h.run(host, "du -s -B1 -c " + " ".join(paths)).splitlines()[-1].split()[0])


def _grow(h: Hosts, host: str, name: str) -> None:
    root = f"/var/lib/lxc/{name}/rootfs/srv/extra"
    h.run(
        host,
        f"mkdir -p {root}; python3 -c 'import os\n"
        f"for i in range({EXTRA_FILES}):\n"
        f'    d = "{root}/%03d" % (i // 200)\n'
        f"    os.makedirs(d, exist_ok=True)\n"
        f'    open("%s/f%d" % (d, i), "wb").write(os.urandom({EXTRA_KIB} * 1024))\'',
    )


def _create(api: Api, op_ms, body: dict) -> None:
    """A container, once its host answers as online (a 409 says why not yet)."""
    for _ in range(60):
        r = api("POST", "/api/v1/containers/", json=body)
        if r.status_code != 409:
            r.raise_for_status()
            api.wait_operation(r.json()["id"], timeout=300)
            return
        print(f"create {body['name']}: {r.status_code} {r.text[:300]}")
        time.sleep(5)
    raise RuntimeError(f"could not create {body['name']}")


def bench_snapshot_store(stack: Stack, op_ms) -> dict:
    api = Api(stack, stack.tokens["bob"])
    h = Hosts(stack)
    host = "lab-a"
    rows: dict[str, list[float]] = {}
    body = {"host": host, "template": "debian", "command": ["python3", "-c", MEMCHECK]}
    for name in ("storectweb", "storehand"):
        _create(api, op_ms, {**body, "name": name})
    time.sleep(3)
    try:
        for size in ("template", "grown"):
            if size == "grown":
                # The template's snapshots go first: the grown rootfs's 1st snapshot is whole again.
                for i in range(10):
                    op_ms(api, "DELETE", f"/api/v1/containers/storectweb/snapshots/template{i}/")
                for name in ("storectweb", "storehand"):
                    _grow(h, host, name)
            rootfs = _du(h, host, "/var/lib/lxc/storectweb/rootfs") / 2**20
            label = f"rootfs {rootfs:.0f} MiB"
            frozen, added = [], []
            for i in range(10):
                _, _, op = op_ms(api, "POST", "/api/v1/containers/storectweb/snapshots/", {"name": f"{size}{i}"})
                frozen.append(op["result"]["stats"]["frozen_ms"])
                added.append(op["result"]["added_bytes"] / 2**20)
            ten = _du(h, host, *[f"{SNAPS}/storectweb/{size}{i}" for i in range(10)]) / 2**20
            rows[f"{label}: 1st snapshot on disk (nothing to share with), MiB"] = [added[0]]
            rows[f"{label}: 10th snapshot added, MiB"] = [added[9]]
            rows[f"{label}: ten snapshots on disk, each file once, MiB (target <= 2 x the 1st)"] = [ten]
            rows[f"{label}: frozen, ctweb, ms"] = frozen
            last = op["result"]
            rows[f"{label}: memory images stored (zstd), MiB"] = [last["images_bytes"] / 2**20]
            rows[f"{label}: memory images uncompressed, MiB"] = [last["images_raw_bytes"] / 2**20]
            by_hand, hand_disk = [], 0
            for i in range(REPEAT_BY_HAND):
                d = f"{WORK}/storehand/{size}{i}"
                out = h.run(
                    host,
                    f"rm -rf {WORK}/storehand; mkdir -p {d}; date +%s%N; lxc-freeze -n storehand; "
                    f"lxc-checkpoint -n storehand -D {d}/images; cp -a /var/lib/lxc/storehand/rootfs {d}/rootfs; "
                    f"lxc-unfreeze -n storehand; date +%s%N",
                )
                by_hand.append(_ms_between(out))
                hand_disk = _du(h, host, d) / 2**20
            h.run(host, f"rm -rf {WORK}/storehand")
            rows[f"{label}: frozen, by hand (freeze, dump, cp -a, unfreeze), ms"] = by_hand
            rows[f"{label}: one snapshot by hand on disk, MiB"] = [hand_disk]
            # Restore: the 10th from zstd images, then the 9th with its images made plain.
            h.run(host, f'cd {SNAPS}/storectweb/{size}8/images && for f in *.zst; do zstd -q -d --rm "$f"; done')
            for snap, what in ((f"{size}9", "zstd"), (f"{size}8", "plain")):
                times = []
                for _ in range(3):
                    _, _, op = op_ms(api, "POST", f"/api/v1/containers/storectweb/snapshots/{snap}/restore")
                    times.append(op["result"]["stats"]["total_ms"])
                rows[f"{label}: restore from {what} images, ms"] = times
    finally:
        for name in ("storectweb", "storehand"):
            try:
                op_ms(api, "DELETE", f"/api/v1/containers/{name}/")
            except Exception as e:  # report, keep cleaning
                print(f"could not delete {name}: {e}")
        h.run(host, f"rm -rf {WORK}/storehand")
    return {k: summary(v) for k, v in rows.items()}


def summary(values: list[float]) -> dict:
    return {
        "n": len(values),
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
    }


BTRFS_HOST = "lab-b"  # on btrfs when the lab came up with CTWEB_LAB_BTRFS=lab-b (lab/core.py)


def _fs_used(h: Hosts, host: str) -> int:
    """Bytes the filesystem of /var/lib/ctweb says it uses (statvfs), after committing what is pending."""
    blocks, free, size = h.run(host, "sync -f /var/lib/ctweb; stat -f -c '%b %f %S' /var/lib/ctweb").split()
    return (int(blocks) - int(free)) * int(size)


def bench_snapshot_store_btrfs(stack: Stack, op_ms) -> dict:
    """The ten stateful snapshots of an idle debian container (32 MiB pattern) on the lab's btrfs
    host, each one read-only btrfs snapshot of the rootfs taken while frozen: the disk by the
    filesystem's own count (statvfs after a sync) after the 1st and the 10th, the agent's
    added_bytes (FIEMAP), the frozen time; then five more after the rootfs grew by EXTRA (the
    frozen time against rootfs size). {} when the lab has no btrfs host."""
    h = Hosts(stack)
    if BTRFS_HOST not in h.addr or h.run(BTRFS_HOST, "stat -f -c %T /var/lib/lxc").strip() != "btrfs":
        return {}
    api = Api(stack, stack.tokens["bob"])
    name = "storecow"
    _create(
        api, op_ms, {"host": BTRFS_HOST, "template": "debian", "command": ["python3", "-c", MEMCHECK], "name": name}
    )
    time.sleep(3)
    rows: dict[str, list[float]] = {}
    try:
        rootfs = _du(h, BTRFS_HOST, f"/var/lib/lxc/{name}/rootfs") / 2**20
        label = f"btrfs, rootfs {rootfs:.0f} MiB"
        base = _fs_used(h, BTRFS_HOST)
        used, frozen, added, results = [], [], [], []
        for i in range(10):
            _, _, op = op_ms(api, "POST", f"/api/v1/containers/{name}/snapshots/", {"name": f"cow{i}"})
            used.append((_fs_used(h, BTRFS_HOST) - base) / 2**20)
            frozen.append(op["result"]["stats"]["frozen_ms"])
            added.append(op["result"]["added_bytes"] / 2**20)
            results.append(op["result"])
        one = results[0]["size_bytes"] / 2**20
        rows[f"{label}: one snapshot whole (rootfs + zstd images), MiB"] = [one]
        rows[f"{label}: 1st snapshot, filesystem used (statvfs), MiB"] = [used[0]]
        rows[f"{label}: 10th snapshot, filesystem used (statvfs, 9th to 10th), MiB"] = [used[9] - used[8]]
        rows[f"{label}: ten snapshots, filesystem used (statvfs), MiB (target <= 2 x one whole)"] = [used[9]]
        rows[f"{label}: 1st snapshot added (agent, extents nothing else shares), MiB"] = [added[0]]
        rows[f"{label}: 10th snapshot added (agent), MiB"] = [added[9]]
        rows[f"{label}: frozen, ctweb (dump + one btrfs snapshot), ms"] = frozen
        # Frozen time against rootfs size: the same after EXTRA more in many small files.
        _grow(h, BTRFS_HOST, name)
        rootfs = _du(h, BTRFS_HOST, f"/var/lib/lxc/{name}/rootfs") / 2**20
        label = f"btrfs, rootfs {rootfs:.0f} MiB"
        base, frozen = _fs_used(h, BTRFS_HOST), []
        for i in range(5):
            _, _, op = op_ms(api, "POST", f"/api/v1/containers/{name}/snapshots/", {"name": f"cowg{i}"})
            frozen.append(op["result"]["stats"]["frozen_ms"])
        rows[f"{label}: five more snapshots, filesystem used (statvfs), MiB"] = [
            (_fs_used(h, BTRFS_HOST) - base) / 2**20
        ]
        rows[f"{label}: frozen, ctweb (dump + one btrfs snapshot), ms"] = frozen
    finally:
        try:
            op_ms(api, "DELETE", f"/api/v1/containers/{name}/")
        except Exception as e:  # report, keep going
            print(f"could not delete {name}: {e}")
    return {k: summary(v) for k, v in rows.items()}
