"""`estimate`: what a migration's prediction needs from the source host, read-only.

The container's memory (what a dump writes: its cgroup's anonymous and shared pages), its rootfs size, and a short sample of how
busy its memory is: the cgroup's page-fault counter and charged bytes read twice, `sample_s`
apart. This kernel has no soft-dirty tracking (docs/LAB-NOTES.md), so the fault rate is the
cheap stand-in for a write rate. Nothing is written and no lock is taken."""

import time

from .common import AgentError, _du, check_name, run
from .criu import _memory_bytes
from .lxc import _cdir, _exists, _state


def _memory_stat(name):
    """The cgroup's memory.stat counters (v1 or v2), {} when it cannot be read."""
    rc, out, err = run(["lxc-cgroup", "-n", name, "memory.stat"], timeout=20)
    stats = {}
    if rc == 0:
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                stats[parts[0]] = int(parts[1])
    return stats


def _dumpable_bytes(name, stats=None):
    """The memory a dump writes: anonymous and shared-memory pages (memory.stat: v1 total_rss +
    total_shmem, v2 anon + shmem), not the page cache the cgroup also charges; the charged
    total when the counters are missing."""
    stats = _memory_stat(name) if stats is None else stats
    for anon, shmem in (("total_rss", "total_shmem"), ("anon", "shmem"), ("rss", "shmem")):
        if anon in stats:
            return stats[anon] + stats.get(shmem, 0)
    return _memory_bytes(name)


def cmd_estimate(params):
    name = check_name(params.get("name"))
    sample_s = params.get("sample_s", 1.0)
    if isinstance(sample_s, bool) or not isinstance(sample_s, (int, float)) or not 0 <= sample_s <= 5:
        raise AgentError("Bad sample_s: a number of seconds from 0 to 5.")
    if not _exists(name):
        raise AgentError(f"There is no container {name} on this host.")
    state = _state(name)
    out = {"state": state, "rootfs_bytes": _du(_cdir(name)), "memory_bytes": 0, "charged_bytes": 0, "sample": None}
    if state != "RUNNING":
        return out
    before, m0, t0 = _memory_stat(name), _memory_bytes(name), time.monotonic()
    if sample_s:
        time.sleep(sample_s)
    after, m1, t1 = _memory_stat(name), _memory_bytes(name), time.monotonic()
    out["memory_bytes"], out["charged_bytes"] = _dumpable_bytes(name, after), m1
    dt = max(t1 - t0, 1e-3)
    key = "total_pgfault" if "total_pgfault" in after else "pgfault"
    faults = after.get(key, 0) - before.get(key, 0) if key in after and key in before else None
    out["sample"] = {
        "seconds": round(dt, 3),
        "pgfault_per_s": round(faults / dt, 1) if faults is not None and faults >= 0 else None,
        "charged_bytes_per_s": round((m1 - m0) / dt, 1),
    }
    return out
