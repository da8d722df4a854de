"""Comparing two stateful snapshots of one container: processes added and gone, memory
grown and shrunk (from the contents decoded out of their CRIU images)."""


def _processes(snapshot) -> dict:
    procs = {}
    for p in (snapshot.contents or {}).get("processes") or []:
        key = (p.get("pid"), p.get("command") or p.get("comm") or "")
        procs[key] = p
    return procs


def _label(key) -> dict:
    pid, command = key
    return {"pid": pid, "command": command}


def compare_snapshots(a, b) -> dict:
    pa, pb = _processes(a), _processes(b)
    memory = []
    for key in sorted(set(pa) & set(pb), key=lambda k: (k[0] is None, k[0])):
        before = pa[key].get("dumped_bytes") or 0
        after = pb[key].get("dumped_bytes") or 0
        if before != after:
            memory.append({**_label(key), "before_bytes": before, "after_bytes": after, "change_bytes": after - before})
    return {
        "a": a.name,
        "b": b.name,
        "stateful": a.stateful and b.stateful,
        "processes_added": [_label(k) for k in sorted(set(pb) - set(pa), key=str)],
        "processes_gone": [_label(k) for k in sorted(set(pa) - set(pb), key=str)],
        "memory_grown": [m for m in memory if m["change_bytes"] > 0],
        "memory_shrunk": [m for m in memory if m["change_bytes"] < 0],
        "size_change_bytes": (b.size_bytes or 0) - (a.size_bytes or 0),
    }
