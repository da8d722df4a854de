"""Live migration: moving a container, its root filesystem and snapshots to another host.

The worker relays every byte between its two SSH connections (no host trusts another;
everything is encrypted), unless an admin allowed direct transfer on a network holding
both hosts' addresses (core/fleet.py): then the tars go from host to host over plain TCP
with a one-time token, unencrypted, and post-copy pages still go through the dashboard over SSH.
The result's `transport` and `transfer` say which path was taken. Strategies:
- stop-and-copy: sync the rootfs while the container runs, dump and stop it, send the
  images and the rootfs delta, restore on the target;
- restart: the same without memory (stop, copy, start cold), for what CRIU cannot dump,
  and the only way to move a stopped container;
- post-copy: dump without the memory pages (CRIU lazy pages), restore on the target at
  once, and let the target pull the pages from the source's page server -- through a page
  relay on each host (CRIU holds a socketpair to it, no port) and the dashboard pumping
  between the relays over SSH; a broken link or a lost worker only pauses the pull (see
  docs/RELIABILITY.md, "Post-copy: where the state lives"); the source is cleaned up only
  once every page arrived;
- pre-copy is refused with the reason until it is shipped here.

A container is never lost and never runs on two hosts: the source is stopped before the
target restores, and the source copy is removed only after the target runs it.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from datetime import UTC, datetime

from django.conf import settings
from django.db import DatabaseError, transaction
from django.utils import timezone

from core.api import ApiError
from core.audit import Actor, audit
from core.fleet import direct_route
from core.models import FleetSettings
from hosts import ssh
from hosts.handlers import failure
from hosts.models import Host
from operations.events import publish_fleet
from operations.models import Operation
from operations.runner import (
    KEEP_WAITING,
    Cancelled,
    OperationContext,
    OperationFailed,
    WaitFor,
    decision_handler,
    enqueue,
    finish,
    handler,
)

from . import prediction
from .models import Container
from .services import container_operation, usable_host

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


# --- the job -------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.t0 = time.monotonic()
        self.marks: dict[str, float] = {}
        self._start = self.t0

    def lap(self, name: str) -> float:
        now = time.monotonic()
        ms = (now - self._start) * 1000
        self.marks[f"{name}_ms"] = round(self.marks.get(f"{name}_ms", 0) + ms, 1)
        self._start = now
        return ms


def _agent(conn: ssh.HostConnection, ctx: OperationContext, sub: str, params: dict, base: int, span: int) -> dict:
    try:
        return conn.run_agent(sub, params, on_event=ctx.relay(base, span)).data
    except ssh.SSHError as e:
        raise failure(e, prefix=f"{conn.host.name}: ", on=conn.host.name) from e


class _Transfer:
    """How this migration's tars travel (decided once, when it starts) and the bytes moved."""

    def __init__(self, source: Host, target: Host, strategy: str):
        self.source, self.target, self.strategy = source, target, strategy
        self.route, self.why = direct_route(source, target)
        self.bytes = 0
        self.memory_in_images: int | None = None  # bytes of memory pages in the dump's images

    def describe(self) -> dict:
        """What `result.transfer` says: the path of the images and of the memory pages."""
        r = self.route
        pages = {"stop-and-copy": "in-images", "post-copy": "ssh-relay"}.get(self.strategy, "none")
        return {
            "images": "direct-tcp" if r else "ssh-relay",
            "images_encrypted": not r,
            "network": r["network"] if r else None,
            "source_address": r["source_address"] if r else None,
            "target_address": r["target_address"] if r else None,
            "pages": pages,
            "pages_encrypted": {"in-images": not r, "ssh-relay": True}.get(pages),
            # Memory that travelled inside the images (all of it for stop-and-copy; for
            # post-copy the few pages CRIU cannot serve lazily): as encrypted as the images.
            "memory_in_images_bytes": self.memory_in_images,
            "why": self.why,
        }

    def sentence(self) -> str:
        """What `result.transport` says, in words."""
        r = self.route
        if r:
            images = (
                f"sent directly from {self.source.name} ({r['source_address']}) to {self.target.name} "
                f"({r['target_address']}) over TCP on {r['network']}, unencrypted (allowed by an admin)"
            )
        else:
            images = "relayed through the dashboard over both hosts' SSH connections"
        if self.strategy == "post-copy":
            held = ""
            if r and self.memory_in_images:
                held = (
                    f" ({self.memory_in_images / 1024:.0f} KiB of pages CRIU cannot serve lazily went with the "
                    "images, unencrypted)"
                )
            return (
                f"images {images}{held}; memory pulled by the target from the source's CRIU page server "
                "through both hosts' resumable page relays, relayed by the dashboard over SSH (encrypted)"
            )
        if r:
            memory = "; the memory images crossed it unencrypted" if self.strategy == "stop-and-copy" else ""
            return f"root filesystem, snapshots and images {images}{memory}"
        return f"{images} (encrypted)"

    def announce(self) -> str:
        if self.route:
            return f"transfer: directly host to host over TCP, unencrypted ({self.why}); " + (
                "memory pages stay relayed over SSH" if self.strategy == "post-copy" else "memory included"
            )
        return f"transfer: relayed through the dashboard over SSH, encrypted ({self.why})"


def _send(src, dst, ctx, params: dict, label: str, base: int, span: int, xfer: _Transfer) -> dict:
    """Move one tar from the source agent to the target agent, reporting bytes as they go:
    relayed by this worker over SSH, or directly between the hosts where an admin allowed it."""
    last = [0.0, 0.0]

    def on_bytes(n: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.25:
            last[0] = now
            ctx.event("transfer", f"{label}: {n / 1048576:.1f} MiB", base, bytes=xfer.bytes + n, what=label)
            ctx.check_cancel()  # a cancel stops the copy mid-stream (both ends are closed)

    def on_tick() -> None:  # a direct stream that moves nothing for a while still hears a cancel
        now = time.monotonic()
        if now - last[1] >= 0.5:
            last[1] = now
            ctx.check_cancel()

    how = f" (sent directly on {xfer.route['network']})" if xfer.route else ""
    try:
        # The receiver gives up on its own if nothing arrives for a while (a cut link).
        stall = {"stall_s": int(max(settings.SSH_DEAD_AFTER_S * 2, 10))}
        if xfer.route:
            n, result = ssh.direct(src, dst, {**params, **stall}, xfer.route, on_bytes, on_tick)
        else:
            n, result = ssh.relay(
                src.open_stream("send", params), dst.open_stream("receive", {**params, **stall}), on_bytes
            )
    except ssh.AgentFailed as e:
        raise OperationFailed(f"Transfer of the {label}{how} failed: {e}", e.details) from e
    except ssh.SSHError as e:
        raise OperationFailed(f"Transfer of the {label}{how} failed: {e}") from e
    xfer.bytes += n
    ctx.event("transfer", f"{label}: {n / 1048576:.1f} MiB sent", base + span, bytes=xfer.bytes, what=label)
    dropped = (result or {}).get("config_dropped")
    if dropped:  # the target rewrote the config from its allowlist (docs/SECURITY.md)
        names = dropped if isinstance(dropped, list) else [f"{s}: {', '.join(k)}" for s, k in dropped.items()]
        ctx.event("config", f"{label}: the target dropped from the config: {'; '.join(map(str, names))}", base + span)
    return result


@handler("migrate")
def migrate(ctx: OperationContext) -> dict:
    op = ctx.op
    container, source, target = op.container, op.host, op.target_host
    if container is None or target is None:
        raise OperationFailed("The container or the target host of this migration no longer exists.")
    strategy = op.params["strategy"]
    live = strategy in ("stop-and-copy", "post-copy")
    base = {"name": container.name, "migration": op.pk}
    clock = _Clock()
    xfer = _Transfer(source, target, strategy)
    ctx.remember(transfer=xfer.describe())
    ctx.event(
        "preflight", f"{strategy} of {container.name} from {source.name} to {target.name} ({op.params.get('why')})", 1
    )
    ctx.event("preflight", xfer.announce(), 1)
    try:
        with ExitStack() as hosts:
            src = hosts.enter_context(ssh.connect(source))
            dst = hosts.enter_context(ssh.connect(target))
            return _migrate(ctx, src, dst, container, strategy, live, base, clock, xfer, hosts)
    except ssh.SSHError as e:  # connecting; later SSH failures are turned into OperationFailed
        raise OperationFailed(str(e)) from e


def _migrate(ctx, src, dst, container, strategy, live, base, clock, xfer: _Transfer, hosts: ExitStack) -> dict:
    source, target = src.host, dst.host
    lazy = strategy == "post-copy"
    tunnel = None
    committed = False
    was_running = container.state == Container.State.RUNNING
    try:
        # 1. Preflight: nothing has changed yet, so any failure leaves everything as it was
        # (the working directories it made on both hosts are removed by _roll_back).
        prep = _agent(src, ctx, "migrate-prepare", {**base, "live": live}, 2, 3)
        # The host's word, not our last refresh: what runs is what must be stopped.
        was_running = prep["state"] == "RUNNING"
        ctx.remember(was_running=was_running, prediction=prediction.for_migration(ctx.op, strategy, prep))
        if live and not was_running:
            raise OperationFailed(f"{container.name} is {prep['state']} on {source.name}: there is no memory to move.")
        bridge = (target.capabilities.get("network") or {}).get("bridge")
        _agent(dst, ctx, "migrate-check", {**base, "need_bytes": prep["need_bytes"], "bridge": bridge}, 5, 2)
        if live:
            _send(src, dst, ctx, {**base, "what": "cpuinfo"}, "CPU description", 7, 1, xfer)
            _agent(dst, ctx, "cpuinfo-check", base, 8, 1)
        clock.lap("preflight")
        ctx.check_cancel()

        # 2. Copy the rootfs and the snapshots while the container still runs.
        _send(src, dst, ctx, {**base, "what": "rootfs"}, "root filesystem", 10, 30, xfer)
        if prep.get("snapshots"):
            _send(src, dst, ctx, {**base, "what": "snapshots"}, "snapshots", 40, 10, xfer)
        if prep.get("has_saved_state"):
            _send(src, dst, ctx, {**base, "what": "state"}, "saved state", 50, 2, xfer)
        clock.lap("presync")
        ctx.check_cancel()

        # 3. Freeze: from here the container is down until the target runs it.
        down_from = time.monotonic()
        stats = {}
        # From here only the source can say whether it was stopped; frozen_at is the state
        # a post-copy's source keeps (an admin may resume it from there).
        ctx.remember(stopping=True, frozen_at=_now_iso())
        if live:
            ctx.event("dump", f"dumping {container.name} on {source.name}" + (" (lazy pages)" if lazy else ""), 55)
            dumped = _agent(src, ctx, "migrate-dump", {**base, "lazy": lazy}, 55, 10)
            stats = dumped.get("stats") or {}
            xfer.memory_in_images = dumped.get("pages_bytes")
            ctx.remember(transfer=xfer.describe())
        elif was_running:
            ctx.event("stop", f"stopping {container.name} on {source.name}", 55)
            _agent(src, ctx, "stop", {"name": container.name}, 55, 10)
        committed = True  # the source is stopped: a failure now resumes it
        if lazy:
            # CRIU's page server talks to the source's page relay over a socketpair (no
            # port); this pump carries the relays' stream between the hosts, re-attaching
            # after any broken link, so neither CRIU process ever sees its connection close.
            if not dumped.get("relay"):
                raise OperationFailed(f"{source.name}'s agent did not start a page relay.")
            tunnel = ssh.PagePump(source, target, base).start()
            hosts.callback(tunnel.stop)
            ctx.event("dump", f"the page server on {source.name} serves through its page relay (no port)", 65)
        clock.lap("dump")
        ctx.check_cancel()

        # 4. What changed since the copy, and the memory images.
        _send(src, dst, ctx, {**base, "what": "delta"}, "rootfs changes", 66, 6, xfer)
        if live:
            _send(src, dst, ctx, {**base, "what": "images"}, "memory images", 72, 10, xfer)
        clock.lap("transfer")
        ctx.check_cancel()

        # 5. Run it on the target. From the moment it runs there, a cancel is too late.
        restored = {}
        if live:
            ctx.event("restore", f"restoring {container.name} on {target.name}", 84)
            params = {**base, "lazy": True} if lazy else base
            restored = _agent(dst, ctx, "migrate-restore", params, 84, 8)
        elif was_running:
            ctx.event("restore", f"starting {container.name} on {target.name}", 84)
            _agent(dst, ctx, "start", {"name": container.name}, 84, 8)
        downtime_ms = (time.monotonic() - down_from) * 1000 if was_running else 0
        clock.lap("restore")
    except BaseException as e:  # a crash or a cancel too: never leave a half-moved container
        cancelled = isinstance(e, Cancelled)
        if cancelled:
            failure = OperationFailed("")
        else:
            failure = e if isinstance(e, OperationFailed) else OperationFailed(f"The migration stopped: {e!r}.")
        # A post-copy's relays hold both CRIU ends whatever the pump does: migrate-abort
        # removes the target's, migrate-resume interrupts the dump (CRIU rolls it back).
        _roll_back(ctx, src, dst, container, base, committed, live, was_running, failure)
        if cancelled:
            raise Cancelled(failure.message.strip() or f"{container.name} stayed on {source.name}.") from e
        if isinstance(e, OperationFailed) or not isinstance(e, Exception):
            raise
        raise failure from e
    if ctx.cancel_requested():
        ctx.event("restore", f"a cancel came too late: {container.name} runs on {target.name} already; finishing")

    if lazy:
        # It runs on the target now: the record follows it, whatever happens to the pages.
        _move_record(ctx, container, target, was_running)
        ctx.event("pages", f"{container.name} runs on {target.name}; pulling its memory from {source.name}", 90)
        pulled, stats, src2, dst2 = pull_pages(ctx, src, dst, container, base, tunnel, stats)
        for conn in {src2, dst2} - {src, dst}:  # made again after a broken link
            hosts.callback(conn.close)
        src, dst = src2, dst2
        clock.lap("pages")

    # 6. The target runs it: the source copy can go, and the records follow the container.
    _move_record(ctx, container, target, was_running)
    ctx.event("cleanup", f"removing the source copy on {source.name}", 94)
    try:
        _agent(src, ctx, "migrate-cleanup", {**base, "remove": True}, 94, 5)
    except OperationFailed as e:
        ctx.event("cleanup", f"the source copy could not be removed (it is stopped): {e.message}")
    try:  # the target's working files: the images it restored from, the page daemon's logs
        _agent(dst, ctx, "migrate-cleanup", {**base, "remove": False}, 99, 1)
    except OperationFailed as e:
        ctx.event("cleanup", f"the migration's working files on {target.name} could not be removed: {e.message}")
    clock.lap("cleanup")
    result = {
        "strategy": strategy,
        "why": ctx.op.params.get("why"),
        "source": source.name,
        "target": target.name,
        "downtime_ms": round(downtime_ms, 1),
        "total_ms": round((time.monotonic() - clock.t0) * 1000, 1),
        "bytes_transferred": xfer.bytes,
        "phases": clock.marks,
        "dump_stats": stats,
        "restore_stats": restored.get("stats") or {},
        "transport": xfer.sentence(),
        "transfer": xfer.describe(),
    }
    if ctx.cancel_requested():
        result["cancel"] = f"asked for after {container.name} ran on {target.name}: too late, so the migration finished"
    if lazy:
        result["pages_ms"] = pulled.get("ms")
        result["page_bytes"] = tunnel.bytes_down
        result["page_relay"] = {"rounds": tunnel.rounds, "bytes_up": tunnel.bytes_up, "relay": pulled.get("relay")}
        result["bytes_transferred"] += tunnel.bytes_down + tunnel.bytes_up
    return result


# What each action a waiting migration may offer does: fn(ctx) -> a success's result, or it
# raises OperationFailed (rolled back, with its sentence) or WaitFor (wait again). A new
# action (e.g. post-copy's "resume on the source from the state of HH:MM:SS") is one
# @migration_action("id") function plus the WaitFor(..., actions) that offers it.
MIGRATION_ACTIONS: dict = {}


def migration_action(action_id: str):
    def register(fn):
        MIGRATION_ACTIONS[action_id] = fn
        return fn

    return register


def stall_limit_s() -> float:
    """How long a page pull may go without any progress before it is given up (and left
    for an admin: nothing is removed). No limit on the pull's total time."""
    return float(FleetSettings.load().postcopy_stall_limit_s)


class _Dead:
    """A host that could not be reached again after the pull: its calls fail with a sentence."""

    def __init__(self, host):
        self.host = host

    def run_agent(self, *a, **kw):
        raise ssh.SSHError(f"{self.host.name} cannot be reached.")

    def close(self) -> None:
        pass


class _Link:
    """One host's SSH connection for the page pull's agent calls, made again when it breaks."""

    def __init__(self, conn):
        self.host, self.conn = conn.host, conn

    def live(self):
        """A working connection for what follows the pull (the first one may have broken)."""
        if self.conn is None:
            try:
                self.conn = ssh._open(self.host)
            except ssh.SSHError:
                return _Dead(self.host)
        return self.conn

    def call(self, ctx, sub: str, params: dict) -> dict:
        if self.conn is None:
            self.conn = ssh._open(self.host)
        try:
            return self.conn.run_agent(sub, params, timeout=max(120, params.get("wait_s", 0) + 60)).data
        except Exception as e:  # noqa: BLE001 (whatever paramiko raises when a link breaks mid-call)
            transport = self.conn.client.get_transport()
            alive = transport is not None and transport.is_active()
            if isinstance(e, ssh.AgentFailed) and alive and not str(e).startswith("The connection to"):
                raise  # the agent's own word
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 (gone already)
                pass
            self.conn = None
            if isinstance(e, ssh.SSHError):
                raise ssh.SSHError(str(e)) from e
            raise ssh.SSHError(f"the link to {self.host.name} broke ({e!r})") from e


def pull_pages(ctx, src, dst, container, base, pump: ssh.PagePump, stats: dict) -> tuple[dict, dict]:
    """Wait, with no limit of time, until the target holds every page (its lazy-pages daemon
    ended with success) and the source's page server has finished. Broken links are
    waited through (the pump re-attaches, the calls reconnect); only a stretch of
    stall_limit_s() without any progress stops the pull: both copies are kept and the
    operation waits for an admin's decision (postcopy_actions), nothing is removed."""
    source, target = src.host, dst.host
    links = {"target": _Link(dst), "source": _Link(src)}
    limit = stall_limit_s()
    t0 = last = time.monotonic()
    seen = None
    told = 0.0
    out: dict = {}
    unreachable: dict[str, str] = {}  # host name -> the last reason it could not be reached
    for role in ("target", "source"):
        while True:
            relay = {}
            try:
                r = links[role].call(ctx, "migrate-lazy-wait", {**base, "role": role, "wait_s": 5})
                unreachable.pop(links[role].host.name, None)
                relay = r.get("relay") or {}
                if r.get("done"):
                    if role == "target":
                        out = {**r, "ms": round((time.monotonic() - t0) * 1000, 1)}
                    else:
                        stats = r.get("stats") or stats
                    break
            except ssh.AgentFailed as e:
                if role == "target" and "ended" in (e.data or {}):
                    _target_lost(ctx, src, dst, container, base, f"{target.name}: {e}", e.details)
                raise OperationFailed(
                    f"{container.name}'s memory pull stopped: {links[role].host.name}: {e}", e.details
                ) from e
            except ssh.SSHError as e:
                unreachable[links[role].host.name] = str(e)
                ctx.event("pages", f"{links[role].host.name} cannot be reached ({e}); waiting for it", None)
                time.sleep(2)
            progress = (relay.get("from_peer"), relay.get("from_criu"))
            now = time.monotonic()
            if relay and progress != seen:
                seen, last = progress, now
            last = max(last, pump.last_progress)  # bytes the pump moved count too
            if now - last > limit:
                pump.stop()
                ctx.event("pages", "\n".join(pump.errors[-20:]) or "no progress", None)
                why = (
                    f"{' and '.join(sorted(unreachable))} cannot be reached"
                    if unreachable
                    else "both hosts answer but no page moved"
                )
                raise WaitFor(
                    f"{container.name}'s memory pull made no progress for {_duration(limit)} ({why}), so it was "
                    f"stopped: {container.name} stays frozen on {source.name} with all its pages (the state of "
                    f"{_hms(ctx.op.result.get('frozen_at'))}), and the partial copy on {target.name} is kept; "
                    "nothing was removed. An admin chooses what happens next.",
                    postcopy_actions(ctx.op, source.name, target.name),
                )
            if now - told >= 2:
                told = now
                ctx.event(
                    "pages",
                    f"{'pulling' if role == 'target' else 'finishing'}: {pump.bytes_down / 1048576:.1f} MiB of pages "
                    f"so far, {pump.rounds} link round(s)",
                    90 if role == "target" else 93,
                    bytes=pump.bytes_down,
                )
    return out, stats, links["source"].live(), links["target"].live()


def _now_iso() -> str:
    return timezone.now().isoformat()


def _hms(iso: str | None) -> str:
    """'HH:MM:SS UTC' of an ISO time (what the admin sees in an action's label)."""
    try:
        return datetime.fromisoformat(iso).astimezone(UTC).strftime("%H:%M:%S UTC")
    except (TypeError, ValueError):
        return "the dump"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


POSTCOPY_RESUME = "postcopy-resume-source"


def postcopy_actions(op, source: str, target: str, can_resume: bool = True) -> list[dict]:
    """What an admin may do with a post-copy stopped mid-pull (the target gone, both hosts
    unreachable, or no progress for the stall limit): the exact actions and what follows."""
    name = op.container_name or "the container"
    at = _hms(op.result.get("frozen_at"))
    actions = []
    if can_resume:
        actions.append(
            {
                "id": POSTCOPY_RESUME,
                "label": f"Resume on {source} from the state of {at}",
                "consequence": f"{name} runs on {source} again from the state it was frozen in at {at}; what ran on "
                f"{target} since is lost. The partial copy on {target} is never resumed: it is stopped and removed "
                f"when {target} answers again, once the copy on {source} is confirmed running. If {source} does not "
                "answer, the operation waits for it with the same choice.",
            }
        )
    actions.append(
        {
            "id": KEEP_WAITING,
            "label": f"Keep waiting for {target}" if can_resume else "Keep waiting",
            "consequence": f"Nothing changes and nothing is removed: {source} keeps {name} frozen with all its pages, "
            f"{target} keeps its partial copy. The hosts are asked again at once and then now and then; when both "
            "answer, the page pull goes on and the migration finishes by itself.",
        }
    )
    return actions


def finish_lost_pull(ctx, src, dst, container, base) -> str | dict:
    """Recovery of a post-copy whose worker was lost during the page pull, or that waited
    (an admin chose "keep waiting", or the hosts answered again): the pull goes on (the
    relays held both CRIU ends meanwhile), then the source copy is removed. After a wait
    the migration simply succeeded (a dict); after a lost worker the sentence says so."""
    source, target = src.host, dst.host
    _move_record(ctx, container, target, True)
    pump = ssh.PagePump(source, target, base).start()
    try:
        _, _, src2, dst2 = pull_pages(ctx, src, dst, container, base, pump, {})
    finally:
        pump.stop()
    src, dst = src2, dst2
    _agent(src, ctx, "migrate-cleanup", {**base, "remove": True}, 94, 5)
    _agent(dst, ctx, "migrate-cleanup", {**base, "remove": False}, 99, 1)
    if ctx.op.result.get("waiting"):
        return {
            "strategy": "post-copy",
            "source": source.name,
            "target": target.name,
            "pages": f"the pull went on after waiting and every page arrived; the copy on {source.name} was removed",
        }
    return (
        f"{container.name} runs on {target.name}: its memory pull went on after the worker was lost and every "
        f"page arrived; the copy on {source.name} was removed."
    )


def _target_lost(ctx, src, dst, container, base, why: str, details: str = "") -> None:
    """The target's lazy-pages daemon died: its restored processes cannot get their
    missing pages, so that copy is dead. The source still holds every page (the relay
    never ended its page server): put the container back there, then raise."""
    failure = OperationFailed(f"{container.name}'s memory could not reach {ctx.op.target_host.name} ({why}).", details)
    lazy_resume_on_source(ctx, src, dst, container, base, failure)
    raise failure


def lazy_resume_on_source(ctx, src, dst, container, base, failure: OperationFailed, force: bool = False) -> None:
    """The target's copy is removed and the source's frozen tasks run on from the state of
    the dump (the lazy dump is interrupted, so CRIU rolls it back). Without `force` (a dead
    target copy, found by the pull) the source is not resumed while the target cannot be
    confirmed clean: the sentence says so. With `force` (an admin's decision; `dst` may be
    None, the target gone) the source is resumed anyway, and the migration records that the
    target's copy is superseded: the tidy stops and removes it when that host answers again,
    once the source's copy is confirmed running (handlers.tidy_migrations); it never runs on."""
    source = src.host
    _db_write(lambda: Container.objects.filter(pk=container.pk).update(host=source))
    container.refresh_from_db()
    if not force:
        _roll_back(ctx, src, dst, container, base, True, True, True, failure)
        return
    op = ctx.op
    target = op.target_host.name if op.target_host else "the target"
    at = _hms(op.result.get("frozen_at"))
    target_clean = False
    if dst is not None:
        try:
            _agent(dst, ctx, "migrate-abort", base, 40, 10)
            target_clean = True
        except OperationFailed as e:
            ctx.event("cleanup", f"the copy on {target} could not be removed now: {e.message}")
    # Written before the source runs, so that whatever happens next the target's copy is
    # known to be stale (never resumed, never followed by the record).
    ctx.remember(superseded={"host": target, "clean": target_clean, "at": _now_iso()})
    ctx.event("decision", f"resuming {container.name} on {source.name} from the state of {at}", 60)
    try:
        data = src.run_agent("migrate-resume", base, on_event=ctx.relay(60, 30)).data
    except ssh.AgentFailed as e:  # the source's word: its frozen state is gone
        _db_write(lambda: Container.objects.filter(pk=container.pk).update(state=Container.State.STOPPED))
        failure.message = (
            f"{container.name} could not be resumed on {source.name} ({e}); it is stopped there. The copy on "
            f"{target} is kept as it is (it is removed only once a copy is confirmed running)."
        )
        failure.details = e.details
        return
    try:  # it runs from its tasks again: the relay and the working files can go
        _agent(src, ctx, "migrate-cleanup", {**base, "remove": False}, 92, 5)
    except OperationFailed as e:
        ctx.event("cleanup", f"the migration's working files on {source.name} could not be removed: {e.message}")
    state = data.get("state", "RUNNING")
    _db_write(lambda: Container.objects.filter(pk=container.pk).update(host=source, state=state))
    container.refresh_from_db()
    publish_fleet("container", {"name": container.name, "host": source.name, "state": state})
    failure.message = (
        f"Rolled back by an admin's decision: {container.name} was resumed on {source.name} from the state of {at}; "
        f"what ran on {target} since is lost. "
        + (
            f"The copy on {target} was removed."
            if target_clean
            else f"The partial copy on {target} is never resumed: it is stopped and removed when {target} answers "
            "again."
        )
    )


@migration_action(POSTCOPY_RESUME)
def lazy_resume_decision(ctx: OperationContext) -> dict:
    """The admin chose to resume a stopped post-copy on its source (lazy_resume_on_source,
    forced). A source that does not answer: the operation waits again with the same choice."""
    op = ctx.op
    container, source, target = op.container, op.host, op.target_host
    base = {"name": container.name, "migration": op.pk}
    failure = OperationFailed("")
    try:
        with ExitStack() as hosts:
            src = hosts.enter_context(ssh.connect(source))
            dst = None
            if target is not None:
                try:
                    dst = hosts.enter_context(ssh.connect(target))
                except ssh.SSHError as e:
                    ctx.event("decision", f"{target.name} cannot be reached ({e}): its copy is dealt with later")
            lazy_resume_on_source(ctx, src, dst, container, base, failure, force=True)
    except ssh.SSHError as e:  # connecting, or the link broke while the source resumed: unknown
        raise WaitFor(
            f"{source.name} could not be asked to resume {container.name} ({e}); ctweb asks it again.",
            postcopy_actions(op, source.name, target.name if target else "the target"),
        ) from e
    raise failure


def _move_record(ctx, container, target, was_running) -> None:
    try:
        with transaction.atomic():
            Container.objects.filter(pk=container.pk).update(
                host=target, state=Container.State.RUNNING if was_running else container.state
            )
            Operation.objects.filter(pk=ctx.op.pk).update(container=container)
        container.refresh_from_db()
    except DatabaseError as e:  # the hosts moved it: the recovery asks them again and writes it then
        raise WaitFor(
            f"{container.name} runs on {target.name}, but the database could not record it ({type(e).__name__}); "
            "ctweb asks the hosts again and records where it runs."
        ) from e
    publish_fleet(
        "container", {"name": container.name, "host": target.name, "state": container.state, "ipv4": container.ipv4}
    )


def _roll_back(ctx, src, dst, container, base, committed, live, was_running, error: OperationFailed) -> None:
    """After a failure: nothing half-made stays on the target, and the source keeps the container.
    `dst` is None when the target cannot be reached at all."""
    target_name = ctx.op.target_host.name if ctx.op.target_host else "the target"
    ctx.event("cleanup", f"migration failed: {error.message}; cleaning up the target")
    target_clean = False
    if dst is None:
        ctx.event("cleanup", f"{container.name}'s target cannot be reached: it could not be confirmed clean")
    else:
        try:
            _agent(dst, ctx, "migrate-abort", base, 95, 1)
            target_clean = True
        except OperationFailed as e:
            ctx.event("cleanup", f"the target could not be confirmed clean: {e.message}")
    if not committed and was_running and ctx.op.result.get("stopping"):
        # The dump may have gone through although nobody heard of it (its agent or the
        # link died first): the source's word decides. `inspect` waits for a dump still
        # running there, and thaws what an interrupted one left frozen. No answer is no
        # answer: the operation waits and asks again (recovery.py), it guesses nothing.
        try:
            seen = _agent(src, ctx, "inspect", {**base, "thaw": True}, 96, 1)
            committed = seen.get("exists") and seen.get("state") == "STOPPED"
            # A lazy dump goes on without its agent: CRIU holds the tasks frozen as a page
            # server. Only migrate-resume gives them back (and copes with one rolled back).
            committed = committed or bool((seen.get("migration") or {}).get("lazy_dump"))
        except OperationFailed as e:
            ctx.event("cleanup", f"could not ask {src.host.name} how {container.name} is: {e.message}")
            raise WaitFor(
                f"{error.message.strip()} {src.host.name} could not be asked whether {container.name} was stopped "
                f"there ({e.message}); ctweb asks it again until it answers."
            ) from e
    if committed and not target_clean and ctx.op.params.get("strategy") != "post-copy":
        # The source is stopped and the target may run it: nothing is guessed. The source
        # keeps its dump as it is, the operation waits for the target, and an admin may decide.
        _db_write(lambda: Container.objects.filter(pk=container.pk).update(state=Container.State.STOPPED))
        raise WaitFor(
            f"{error.message.strip()} {container.name} is stopped on {src.host.name}"
            f"{' with its memory dumped' if live else ''}; {target_name} could not be confirmed clean, so it may "
            f"run there. ctweb asks {target_name} again until it answers.",
            _unreachable_target_actions(src.host.name, target_name, live),
        )
    if committed and not target_clean:
        # The target may be running it: resuming the source could make two. Keep the
        # source stopped with its memory as saved state, and say so.
        try:
            data = _agent(src, ctx, "migrate-cleanup", {**base, "remove": False, "keep_state": True}, 96, 1)
            saved = bool(data.get("has_saved_state"))
        except OperationFailed:
            saved = False
        Container.objects.filter(pk=container.pk).update(state=Container.State.STOPPED, has_saved_state=saved)
        error.message += (
            f" {container.name} is stopped on {src.host.name}{' with its memory saved' if saved else ''}; "
            f"{target_name} could not be confirmed clean, so check it before starting {container.name} again."
        )
        return
    if not committed:
        try:
            _agent(src, ctx, "migrate-cleanup", {**base, "remove": False}, 96, 1)
        except OperationFailed:
            pass
        if not target_clean:
            error.message += (
                f" {container.name} stayed on {src.host.name}; {target_name} could not be confirmed clean: what this "
                f"migration left there is removed when ctweb next reaches it."
            )
        else:
            error.message += f" {container.name} stayed on {src.host.name}; nothing is left on {target_name}."
        return
    # The source was stopped for the move. Resuming it there is safe: the target copy is gone.
    try:
        if live:
            data = _agent(src, ctx, "migrate-resume", base, 97, 2)
        else:
            data = _agent(src, ctx, "start", {"name": container.name}, 97, 2) if was_running else {"state": "STOPPED"}
        Container.objects.filter(pk=container.pk).update(state=data.get("state", "RUNNING"))
        error.message += f" {container.name} was resumed on {src.host.name}."
        try:  # it runs from them again: the dump and the working files can go
            _agent(src, ctx, "migrate-cleanup", {**base, "remove": False}, 99, 1)
        except OperationFailed as e:
            ctx.event("cleanup", f"the migration's working files on {src.host.name} could not be removed: {e.message}")
    except OperationFailed as e:
        saved = bool((e.result or {}).get("has_saved_state"))
        Container.objects.filter(pk=container.pk).update(state=Container.State.STOPPED, has_saved_state=saved)
        error.message += f" Resuming it on {src.host.name} failed too ({e.message}); it is stopped there" + (
            " with its memory saved: Start resumes it." if saved else "."
        )
    container.refresh_from_db()
    publish_fleet("container", {"name": container.name, "host": src.host.name, "state": container.state})


def _db_write(fn):
    try:
        return fn()
    except DatabaseError as e:
        raise WaitFor(f"The database could not be written ({type(e).__name__}); ctweb asks the hosts again.") from e


RESUME_SOURCE = "resume-source"


def _unreachable_target_actions(source: str, target: str, live: bool) -> list[dict]:
    return [
        {
            "id": RESUME_SOURCE,
            "label": f"Resume on {source}" + (" from its dump" if live else ""),
            "consequence": f"It runs on {source} again at once{' from the state it was dumped in' if live else ''}. "
            f"The copy on {target}, if any, is removed when {target} is reachable again; if {target} was already "
            "running it, what ran there since is lost.",
        },
        {
            "id": KEEP_WAITING,
            "label": f"Keep waiting for {target}",
            "consequence": f"Nothing changes: {target} is asked again now and then until it answers, and the "
            "migration then finishes or rolls back by itself.",
        },
    ]


@decision_handler("migrate")
def decide_migration(ctx: OperationContext, action: str) -> dict:
    """The admin's choice on a waiting migration."""
    if action not in MIGRATION_ACTIONS or ctx.op.container is None or ctx.op.host is None:
        raise OperationFailed(f"'{action}' cannot be carried out on this migration.")
    return MIGRATION_ACTIONS[action](ctx)


@migration_action(RESUME_SOURCE)
def resume_on_source(ctx: OperationContext) -> dict:
    """Stop-and-copy or restart whose target became unreachable after the source was stopped."""
    op = ctx.op
    container, source = op.container, op.host
    live = op.params.get("strategy") in ("stop-and-copy", "post-copy")
    base = {"name": container.name, "migration": op.pk}
    try:
        with ssh.connect(source) as src:
            if live:
                data = _agent(src, ctx, "migrate-resume", base, 50, 40)
            else:
                data = _agent(src, ctx, "start", {"name": container.name}, 50, 40)
            try:
                _agent(src, ctx, "migrate-cleanup", {**base, "remove": False}, 95, 5)
            except OperationFailed as e:
                ctx.event(
                    "cleanup", f"the migration's working files on {source.name} could not be removed: {e.message}"
                )
    except (ssh.SSHError, OperationFailed) as e:
        raise WaitFor(
            f"{source.name} could not resume {container.name} ({e}); ctweb asks the hosts again.",
            _unreachable_target_actions(source.name, op.target_host.name if op.target_host else "the target", live),
        ) from e
    _db_write(lambda: Container.objects.filter(pk=container.pk).update(host=source, state=data.get("state", "RUNNING")))
    publish_fleet("container", {"name": container.name, "host": source.name, "state": data.get("state", "RUNNING")})
    target = op.target_host.name if op.target_host else "the target"
    raise OperationFailed(
        f"Rolled back by an admin's decision: {container.name} was resumed on {source.name}. What this migration "
        f"left on {target} is removed when ctweb next reaches it."
    )


# --- evacuation ------------------------------------------------------------------------


def start_evacuation(actor: Actor, host: Host) -> Operation:
    running = Operation.objects.filter(kind=Operation.Kind.EVACUATE, host=host, status__in=Operation.ACTIVE).first()
    if running:
        raise ApiError(f"{host.name} is being evacuated already ({running.api_url()}).", 409)
    if not host.containers.exists():
        raise ApiError(f"{host.name} has no containers to move.", 409)
    with transaction.atomic():
        op = Operation.objects.create(kind=Operation.Kind.EVACUATE, host=host, created_by=actor.user)
        enqueue(op)
    audit(actor, "host.evacuate", host, detail=f"op {op.pk}")
    return op


@handler("evacuate")
def evacuate(ctx: OperationContext) -> dict:
    op, source = ctx.op, ctx.op.host
    targets = list(
        Host.objects.exclude(pk=source.pk).filter(status=Host.Status.ONLINE).exclude(key_data="").order_by("name")
    )
    containers = list(source.containers.order_by("name"))
    ctx.event("preflight", f"{len(containers)} container(s) to move from {source.name} to {len(targets)} host(s)", 1)
    children, refused = [], {}
    for i, container in enumerate(containers):
        reasons = []
        for k in range(len(targets)):  # round robin, then the next host that can take it
            target = targets[(i + k) % len(targets)]
            try:
                child = start_migration(Actor(op.created_by), container, target.name, "auto")
            except ApiError as e:
                reasons.append(f"{target.name}: {e.detail}")
                continue
            Operation.objects.filter(pk=child.pk).update(parent=op)
            children.append(child.pk)
            ctx.event("migrate", f"{container.name} -> {target.name}: operation {child.pk}", 2, child=child.pk)
            break
        else:
            refused[container.name] = "; ".join(reasons) or "there is no other online host"
            ctx.event("migrate", f"{container.name} cannot move: {refused[container.name]}")
    ctx.remember(children=children, refused=refused, containers=len(containers))
    # No thread waits for the children: the row waits (status waiting) and each child's end
    # asks it again (runner.finish); check_evacuation ends it when the last one ended.
    return check_evacuation(ctx)


def check_evacuation(ctx: OperationContext):
    """Where an evacuation's children are: a cancel is passed on to them; when all have
    ended, the evacuation ends with what they did (a dict is success), else it waits."""
    op, source = ctx.op, ctx.op.host
    children = op.result.get("children") or []
    refused = op.result.get("refused") or {}
    if op.cancel_requested or Operation.objects.filter(pk=op.pk, cancel_requested=True).exists():
        for child in Operation.objects.filter(pk__in=children, status__in=Operation.ACTIVE):
            Operation.objects.filter(pk=child.pk).update(cancel_requested=True)  # running ones stop where safe
            if child.status == Operation.Status.PENDING:
                _finish_pending = Operation.objects.filter(pk=child.pk, status=Operation.Status.PENDING)
                if _finish_pending.update(status=Operation.Status.RUNNING):
                    child.status = Operation.Status.RUNNING
                    finish(child, Operation.Status.CANCELLED, error="Cancelled with its evacuation before it started.")
        if not Operation.objects.filter(pk__in=children, status__in=Operation.ACTIVE).exists():
            raise Cancelled(f"The evacuation of {source.name if source else 'the host'} was cancelled.")
    ended = dict(Operation.objects.filter(pk__in=children, status__in=Operation.TERMINAL).values_list("pk", "status"))
    if len(ended) < len(children):
        raise WaitFor(
            f"{len(ended)} of {len(children)} migration(s) ended; waiting for the others.",
            changed=lambda: (
                Operation.objects.filter(pk__in=children, status__in=Operation.TERMINAL).count() != len(ended)
            ),
        )
    moved = [c for c, s in ended.items() if s == Operation.Status.SUCCESS]
    failed = {str(c): s for c, s in ended.items() if s != Operation.Status.SUCCESS}
    result = {"children": children, "moved": len(moved), "failed": failed, "refused": refused}
    if failed or refused:
        names = sorted(refused) + [Operation.objects.get(pk=int(c)).container_name for c in failed]
        total = op.result.get("containers") or len(children) + len(refused)
        raise OperationFailed(
            f"{len(names)} of {total} container(s) did not leave {source.name if source else 'the host'}: "
            f"{', '.join(names)}.",
            "\n".join(f"{n}: {r}" for n, r in refused.items()),
            result,
        )
    return result
