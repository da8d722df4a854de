"""The downtime a client of the container sees, measured outside its processes (issue 15 item 4)."""

from __future__ import annotations


def _ago_ms(part) -> float | None:
    """An agent's "so many ms before this result" (bytes from a host may lie: a plausible number or None)."""
    ago = part.get("ago_ms") if isinstance(part, dict) else None
    if isinstance(ago, bool) or not isinstance(ago, int | float) or not 0 <= ago < 86_400_000:
        return None
    return float(ago)


def client_downtime(dumped: dict, dumped_at: float, restored: dict, restored_at: float, source, target) -> dict:
    """How long a client of the container saw it gone: from its freeze on the source until its
    address first answered on the target, both measured outside its processes by the hosts'
    agents (hosts/agent/ctweb_agent/downtime.py) as "N ms before my result line", and placed on
    this worker's clock by when each line arrived: no two hosts' clocks are compared. The error
    is the difference of the two lines' one-way delays over SSH (milliseconds)."""
    frozen, answered = dumped.get("frozen"), restored.get("answered")
    froze_ago, answer_ago = _ago_ms(frozen), _ago_ms(answered)
    how = frozen.get("how") if isinstance(frozen, dict) else None
    since = {
        "freezer": f"its freezer cgroup on {source} left THAWED (the dump froze it)",
        "dump-start": f"the dump started on {source} (no freezer cgroup seen; an upper bound)",
    }.get(how)
    out = {"ms": None, "from": since, "until": None}
    if froze_ago is None or since is None:
        out["why"] = f"{source}'s agent did not say when the container froze"
        return out
    if answer_ago is None:
        why = answered.get("why") if isinstance(answered, dict) else None
        out["why"] = f"no answer from its address on {target}" + (f": {why}"[:300] if isinstance(why, str) else "")
        return out
    address = answered.get("address")
    out["until"] = f"its address{f' {address}' if isinstance(address, str) else ''} answered ICMP echo on {target}"
    out["ms"] = round(((restored_at - answer_ago / 1000) - (dumped_at - froze_ago / 1000)) * 1000, 1)
    return out
