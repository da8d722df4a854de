"""Export and import throughput (issue 16 item 5): a stateful snapshot of a debian container
holding 128 MiB in memory, exported to the dashboard's storage, downloaded, and imported on the
other host as a new container (uploaded), REPEAT times. Rates are the archive's bytes over each
step's own time: the export and import operations' run (started_at to finished_at, as the
worker ran them) and the download's wall time. Beside them, a plain OpenSSH copy of the same
number of bytes from lab-a to lab-b through this machine (an export then an import move them
over that path, with a stop in the dashboard's storage)."""

from __future__ import annotations

import time
from datetime import datetime

from bench.byhand import Hosts, copy_rate
from bench.snapstore import _create, summary
from tests.support.stack import Api, Stack

MEMCHECK_128 = (
    "import hashlib, time\n"
    "buf = bytearray(bytes(range(256)) * 4096 * 128)\n"
    "while True:\n"
    "    open('/tmp/sum', 'w').write(hashlib.sha256(buf).hexdigest())\n"
    "    time.sleep(1)\n"
)
REPEAT = 3


def bench_exports(stack: Stack, op_ms) -> dict:
    api = Api(stack, stack.tokens["bob"])
    rows: dict[str, list[float]] = {}
    name = "xporter"
    _create(
        api, op_ms, {"name": name, "host": "lab-a", "template": "debian", "command": ["python3", "-c", MEMCHECK_128]}
    )
    time.sleep(3)
    imported = []
    try:
        op_ms(api, "POST", f"/api/v1/containers/{name}/snapshots/", {"name": "s"})
        size, export_rate, download_rate, import_rate = [], [], [], []
        for i in range(REPEAT):
            _, worker, op = op_ms(api, "POST", f"/api/v1/containers/{name}/snapshots/s/export")
            n = op["result"]["bytes"]
            size.append(n / 2**20)
            export_rate.append(n / 2**20 / (worker / 1000))
            t0 = time.monotonic()
            r = api.get(op["result"]["download"])
            r.raise_for_status()
            data = r.content
            download_rate.append(len(data) / 2**20 / (time.monotonic() - t0))
            target = f"xported{i}"
            r = api.post("/api/v1/imports", data={"name": target, "host": "lab-b"}, files={"archive": ("a.tar", data)})
            r.raise_for_status()
            imported.append(target)
            done = api.wait_operation(r.json()["id"], timeout=600, interval=0.05)
            if done["status"] != "success":
                raise RuntimeError(f"import {target} failed: {done['error']}")
            run_s = (
                datetime.fromisoformat(done["finished_at"]) - datetime.fromisoformat(done["started_at"])
            ).total_seconds()
            import_rate.append(len(data) / 2**20 / run_s)
            api("DELETE", f"/api/v1/exports/{op['id']}")
        rows["archive (rootfs, zstd memory images, manifest), MiB"] = size
        rows["export: host packs, dashboard checks and keeps it, MiB/s"] = export_rate
        rows["download from the dashboard, MiB/s"] = download_rate
        rows["import: dashboard checks, host checks and places it, MiB/s"] = import_rate
        mib = max(1, round(size[0]))
        rows["plain OpenSSH copy lab-a -> lab-b through this machine, same size, MiB/s"] = [
            copy_rate(Hosts(stack), "lab-a", "lab-b", mib) * 1000 / 2**20 for _ in range(REPEAT)
        ]
    finally:
        for c in imported + [name]:
            try:
                op_ms(api, "DELETE", f"/api/v1/containers/{c}/")
            except Exception as e:  # report, keep cleaning
                print(f"could not delete {c}: {e}")
    return {k: summary(v) for k, v in rows.items()}
