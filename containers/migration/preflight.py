"""Before a migration is queued: which strategies both hosts allow (from their probed
capabilities), `auto` resolved with its reason, and the operation written."""

from __future__ import annotations

from core.api import ApiError
from core.audit import Actor
from hosts.models import Host
from operations.models import Operation

from ..models import Container
from ..services import container_operation, usable_host

STRATEGIES = ("auto", "stop-and-copy", "post-copy", "pre-copy", "restart")


def _version(v: str | None) -> tuple:
    try:
        return tuple(int(x) for x in (v or "").split("."))
    except ValueError:
        return ()


def strategy_support(container: Container, source: Host, target: Host) -> dict[str, str | None]:
    """For each strategy: None when both hosts can do it, else the reason why not."""
    sc, tc = source.capabilities or {}, target.capabilities or {}
    common = None
    if target.pk == source.pk:
        common = f"{container.name} is on {target.name} already."
    elif target.status != Host.Status.ONLINE or not target.is_trusted:
        common = f"{target.name} is {target.get_status_display()}: it must be trusted and online."
    elif source.status != Host.Status.ONLINE:
        common = f"{source.name} is {source.get_status_display()}: probe it until it is online."
    elif sc.get("arch") != tc.get("arch"):
        common = f"{source.name} is {sc.get('arch')} and {target.name} is {tc.get('arch')}."
    elif not tc.get("network") or (sc.get("network") or {}).get("subnet") != tc["network"].get("subnet"):
        common = f"{target.name} does not have {container.name}'s network ({(sc.get('network') or {}).get('subnet')})."
    if common:
        return dict.fromkeys(STRATEGIES[1:], common)
    out: dict[str, str | None] = {"restart": None}
    live = None
    if container.state != Container.State.RUNNING:
        live = f"{container.name} is {container.state}: only a running container has memory to move."
    elif sc.get("criu_check") != "ok" or tc.get("criu_check") != "ok":
        bad = source if sc.get("criu_check") != "ok" else target
        live = f"`criu check` fails on {bad.name}."
    elif _version(tc.get("criu_version")) < _version(sc.get("criu_version")):
        live = f"{target.name}'s CRIU {tc.get('criu_version')} is older than {source.name}'s {sc.get('criu_version')}."
    out["stop-and-copy"] = live
    if live:
        out["post-copy"] = live
    elif not (sc.get("uffd") and tc.get("uffd")):
        out["post-copy"] = "Lazy pages need userfaultfd (uffd and uffd-noncoop) on both hosts."
    elif not (sc.get("page_relay") and tc.get("page_relay")):
        # Without the resumable page relay a broken link could lose the memory: never then.
        bad = source if not sc.get("page_relay") else target
        out["post-copy"] = f"{bad.name}'s agent has no resumable page relay (probe it again to update it)."
    else:
        out["post-copy"] = None
    if live:
        out["pre-copy"] = live
    elif not sc.get("dirty_tracking"):
        out["pre-copy"] = f"{source.name}'s kernel does not track dirty memory (criu feature mem_dirty_track is off)."
    else:
        out["pre-copy"] = "Pre-copy ships only with an end-to-end test that ran it; none has run yet."
    return out


def choose_strategy(container: Container, source: Host, target: Host, wanted: str) -> tuple[str, str]:
    """Resolve `auto` and check the strategy; (strategy, why) or ApiError with the reason."""
    if wanted not in STRATEGIES:
        raise ApiError(f"strategy must be one of {', '.join(STRATEGIES)}.", 400, "strategy")
    support = strategy_support(container, source, target)
    if wanted != "auto":
        if support[wanted]:
            raise ApiError(f"{wanted} is not possible: {support[wanted]}", 409, "strategy")
        return wanted, "asked for"
    for candidate in ("post-copy", "stop-and-copy"):
        if support[candidate] is None:
            return candidate, f"auto: {candidate} is the fastest live strategy both hosts support"
    if support["restart"] is None:
        why = support["stop-and-copy"] or "no live strategy is possible"
        return "restart", f"auto: restart (cold), because {why[0].lower() + why[1:]}"
    raise ApiError(f"{container.name} cannot move to {target.name}: {support['restart']}", 409, "target_host")


def start_migration(actor: Actor, container: Container, target_name: str, strategy: str = "auto", **extra) -> Operation:
    """`extra` goes into the operation's params (containers/planning.py: requested, why, the
    budget and the prediction it was chosen by)."""
    target = usable_host(target_name, field="target_host")
    chosen, why = choose_strategy(container, container.host, target, strategy)
    params = {"strategy": chosen, "requested": strategy, "why": why, **extra}
    return container_operation(actor, container, Operation.Kind.MIGRATE, target_host=target, **params)
