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
    processes sent their clients new TCP data on the target (or, when it held no TCP
    connection that spoke, until its address first answered ICMP echo there), both measured outside its processes by the hosts'
    agents (hosts/agent/ctweb_agent/downtime.py) as "N ms before my result line", and placed on
    this worker's clock by when each line arrived: no two hosts' clocks are compared. The error
    is the difference of the two lines' one-way delays over SSH (milliseconds)."""
    frozen, answered = dumped.get("frozen"), restored.get("answered")
    froze_ago, answer_ago = _ago_ms(frozen), _ago_ms(answered)
    how = frozen.get("how") if isinstance(frozen, dict) else None
    since = {
        "freezer": f"its freezer cgroup on {source} left THAWED (the dump froze it)",
        "seized": f"CRIU seized its init process on {source} (the freezer's moment went unseen)",
        "dump-start": f"the dump started on {source} (no freezer cgroup seen; an upper bound)",
    }.get(how)
    out = {"ms": None, "from": since, "until": None}
    if how == "dump-start" and isinstance(frozen.get("why"), str):  # why no freeze was seen
        out["from_why"] = frozen["why"][:200]
    if froze_ago is None or since is None:
        out["why"] = f"{source}'s agent did not say when the container froze"
        return out
    if answer_ago is None:
        why = answered.get("why") if isinstance(answered, dict) else None
        out["why"] = f"no answer from its address on {target}" + (f": {why}"[:300] if isinstance(why, str) else "")
        return out
    address = answered.get("address")
    where = f"its address{f' {address}' if isinstance(address, str) else ''}"
    answered_ms = round(((restored_at - answer_ago / 1000) - (dumped_at - froze_ago / 1000)) * 1000, 1)
    served_ago = _ago_ms({"ago_ms": answered.get("served_ago_ms")})
    if served_ago is not None and served_ago <= answer_ago:  # served after it answered, never before
        n = answered.get("connections")
        n = n if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 1_000_000 else None
        out["until"] = (
            f"its processes sent new TCP data on {target}"
            + (f" (it held {n} established connection{'s' if n != 1 else ''})" if n else "")
            + f"; {where} had answered ICMP echo {round(answer_ago - served_ago, 1)} ms before"
        )
        out["ms"] = round(((restored_at - served_ago / 1000) - (dumped_at - froze_ago / 1000)) * 1000, 1)
    else:
        out["until"] = f"{where} answered ICMP echo on {target}"
        out["ms"] = answered_ms
        why = answered.get("served_why")
        if isinstance(why, str):
            out["served_why"] = why[:200]
    out["answered_ms"] = answered_ms
    return out


def dump_began(dumped: dict, dumped_at: float, asked_at: float) -> float:
    """When the source's dump began touching the container, on this worker's clock: the moment
    its agent reports ("so many ms before my result line"), placed by when that line arrived. Not
    before the dump was asked for, not after its answer (a host may lie): else when it was asked."""
    frozen = dumped.get("frozen")
    began = _ago_ms({"ago_ms": frozen.get("started_ago_ms")}) if isinstance(frozen, dict) else None
    if began is None:
        return asked_at
    return min(max(dumped_at - began / 1000, asked_at), dumped_at)


def served_wait_s(restored: dict) -> float:
    """How long the target's restore call waited, after the restore, for the container's
    processes to send new TCP data (not downtime: it already ran). At most 5 s, whatever a host says."""
    answered = restored.get("answered") if isinstance(restored, dict) else None
    waited = _ago_ms({"ago_ms": answered.get("served_wait_ms")}) if isinstance(answered, dict) else None
    return min(waited or 0.0, 5000.0) / 1000
