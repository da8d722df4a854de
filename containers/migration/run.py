"""The `migrate` handler: one run of a strategy, its steps in the order of its table
(phases.STRATEGY_STEPS), each step's progress from that table.

The steps: preflight (both hosts asked, nothing changed yet), presync (the rootfs, the
snapshots and a saved state sent while the container runs), dump (the source dumped, or
stopped for a cold move: from here the container is down), transfer (the rootfs delta and
the memory images), restore (it runs on the target), for post-copy pages (the target pulls
the memory from the source's page server), and cleanup (the source copy removed, the
records following the container). Any failure before it runs on the target goes to
rollback.roll_back, which gives it back to the source.
"""

from __future__ import annotations

import time
from contextlib import ExitStack

from django.conf import settings

from hosts import ssh
from operations.runner import Cancelled, OperationContext, OperationFailed, handler

from .. import prediction
from ..models import Container
from .common import call, call_timed, move_record, now_iso
from .downtime import client_downtime, dump_began, served_wait_s
from .phases import STRATEGY_STEPS, Clock, Progress
from .postcopy import DirectPages, postcopy_actions, pull_pages
from .rollback import roll_back
from .transfer import Transfer, rootfs_delta, send, warm


@handler("migrate")
def migrate(ctx: OperationContext) -> dict:
    op = ctx.op
    container, source, target = op.container, op.host, op.target_host
    if container is None or target is None:
        raise OperationFailed("The container or the target host of this migration no longer exists.")
    strategy = op.params["strategy"]
    if strategy not in STRATEGY_STEPS:
        raise OperationFailed(f"{strategy} is not a strategy this dashboard runs.")
    clock = Clock()
    progress = Progress(ctx, STRATEGY_STEPS[strategy])
    xfer = Transfer(source, target, strategy, op.pk)
    ctx.remember(transfer=xfer.describe())
    progress.event(
        "preflight",
        f"{strategy} of {container.name} from {source.name} to {target.name} ({op.params.get('why')})",
        "prepare",
    )
    progress.event("preflight", xfer.announce(), "prepare")
    try:
        with ExitStack() as hosts:
            src = hosts.enter_context(ssh.connect(source))
            dst = hosts.enter_context(ssh.connect(target))
            return Run(ctx, src, dst, container, strategy, progress, clock, xfer, hosts).go()
    except ssh.SSHError as e:  # connecting; later SSH failures are turned into OperationFailed
        raise OperationFailed(str(e)) from e


class Run:
    """One migration between two open connections, step by step."""

    def __init__(self, ctx, src, dst, container, strategy, progress: Progress, clock: Clock, xfer, hosts):
        self.ctx, self.src, self.dst, self.container = ctx, src, dst, container
        self.source, self.target = src.host, dst.host
        self.strategy, self.progress, self.clock, self.xfer, self.hosts = strategy, progress, clock, xfer, hosts
        self.live = strategy in ("stop-and-copy", "post-copy")
        self.lazy = strategy == "post-copy"
        self.base = {"name": container.name, "migration": ctx.op.pk}
        self.was_running = container.state == Container.State.RUNNING
        self.committed = False  # the source is stopped: a failure now resumes it
        self.tunnel: ssh.PagePump | DirectPages | None = None
        self.direct_port = 0
        self.prep: dict = {}
        self.stats: dict = {}
        self.restored: dict = {}
        self.pulled: dict = {}
        self.down_from = 0.0
        self.downtime_ms = 0.0
        self.presync_bytes = 0
        self.warmed: dict = {}
        self.dumped: dict = {}
        self.dumped_at = 0.0
        self.restored_at = 0.0
        self.prestarted: ssh.Prestarted | None = None  # the restore's agent, started in the presync
        self.delta: dict = {}

    def go(self) -> dict:
        ctx, container = self.ctx, self.container
        try:
            self.preflight()
            self.presync()
            self.dump()
            self.transfer()
            self.restore()
        except BaseException as e:  # a crash or a cancel too: never leave a half-moved container
            cancelled = isinstance(e, Cancelled)
            if cancelled:
                failure = OperationFailed("")
            else:
                failure = e if isinstance(e, OperationFailed) else OperationFailed(f"The migration stopped: {e!r}.")
            # A post-copy's relays hold both CRIU ends whatever the pump does: migrate-abort
            # removes the target's, migrate-resume interrupts the dump (CRIU rolls it back).
            actions = postcopy_actions(ctx.op, self.source.name, self.target.name) if self.lazy else None
            roll_back(
                ctx,
                self.src,
                self.dst,
                container,
                self.base,
                self.committed,
                self.live,
                self.was_running,
                failure,
                waiting_actions=actions,
            )
            if cancelled:
                raise Cancelled(failure.message.strip() or f"{container.name} stayed on {self.source.name}.") from e
            if isinstance(e, OperationFailed) or not isinstance(e, Exception):
                raise
            raise failure from e
        if ctx.cancel_requested():
            ctx.event(
                "restore", f"a cancel came too late: {container.name} runs on {self.target.name} already; finishing"
            )
        if self.lazy:
            self.pages()
        self.cleanup()
        return self.result()

    def preflight(self) -> None:
        """Nothing has changed yet, so any failure leaves everything as it was (the working
        directories it made on both hosts are removed by the roll-back)."""
        ctx, p, src, dst, base = self.ctx, self.progress, self.src, self.dst, self.base
        self.prep = call(src, p, "prepare", "migrate-prepare", {**base, "live": self.live})
        # The host's word, not our last refresh: what runs is what must be stopped.
        self.was_running = self.prep["state"] == "RUNNING"
        ctx.remember(
            was_running=self.was_running, prediction=prediction.for_migration(ctx.op, self.strategy, self.prep)
        )
        if self.live and not self.was_running:
            raise OperationFailed(
                f"{self.container.name} is {self.prep['state']} on {self.source.name}: there is no memory to move."
            )
        bridge = (self.target.capabilities.get("network") or {}).get("bridge")
        call(dst, p, "check", "migrate-check", {**base, "need_bytes": self.prep["need_bytes"], "bridge": bridge})
        if self.live:
            send(src, dst, p, "cpuinfo", {**base, "what": "cpuinfo"}, "CPU description", self.xfer)
            call(dst, p, "cpuinfo-check", "cpuinfo-check", base)
        self.clock.lap("preflight")
        ctx.check_cancel()

    def presync(self) -> None:
        """The rootfs and the snapshots, copied while the container still runs."""
        p, src, dst, base, xfer = self.progress, self.src, self.dst, self.base, self.xfer
        if self.live:  # the restore's agent, started now: its start-up is not in the downtime
            self.prestarted = dst.prestart_agent("migrate-restore")
            if self.prestarted is not None:
                self.hosts.callback(self.prestarted.close)
        before = xfer.bytes
        journal = {"journal": settings.MIGRATION_JOURNAL}  # the delta's change journal starts first
        send(src, dst, p, "rootfs", {**base, "what": "rootfs", **journal}, "root filesystem", xfer)
        if self.prep.get("snapshots"):
            send(src, dst, p, "snapshots", {**base, "what": "snapshots"}, "snapshots", xfer)
        if self.prep.get("has_saved_state"):
            send(src, dst, p, "state", {**base, "what": "state"}, "saved state", xfer)
        self.clock.lap("presync")
        self.presync_bytes = xfer.bytes - before
        self.ctx.check_cancel()
        # The streams the downtime needs, ready before it starts.
        if not xfer.route:
            try:
                self.warmed["delta"] = warm(src, dst, self.hosts)
                if self.live:
                    self.warmed["images"] = warm(src, dst, self.hosts)
            except ssh.SSHError as e:
                raise OperationFailed(f"Could not open the transfer streams: {e}") from e

    def dump(self) -> None:
        """Freeze: from here the container is down until the target runs it."""
        ctx, p, src, base, name = self.ctx, self.progress, self.src, self.base, self.container.name
        self.down_from = time.monotonic()
        # From here only the source can say whether it was stopped; frozen_at is the state
        # a post-copy's source keeps (an admin may resume it from there).
        ctx.remember(stopping=True, frozen_at=now_iso())
        dumped: dict = {}
        if self.live:
            p.event("dump", f"dumping {name} on {self.source.name}" + (" (lazy pages)" if self.lazy else ""), "dump")
            params = {**base, "lazy": self.lazy}
            if self.lazy and self.xfer.keys is not None:
                params["direct_pages"] = self.xfer.direct_pages_source()
            dumped, self.dumped_at = call_timed(src, p, "dump", "migrate-dump", params)
            self.dumped = dumped
            # The downtime from when the dump began on the source, not from when this worker
            # asked (the SSH session and the agent's start, the container still serving)
            self.down_from = dump_began(dumped, self.dumped_at, self.down_from)
            self.stats = dumped.get("stats") or {}
            self.xfer.memory_in_images = dumped.get("pages_bytes")
            ctx.remember(transfer=self.xfer.describe())
        elif self.was_running:
            p.event("stop", f"stopping {name} on {self.source.name}", "dump")
            call(src, p, "dump", "stop", {"name": name})
        self.committed = True
        if self.lazy:
            # CRIU's page server talks to the source's page relay over a socketpair (no
            # port); this pump carries the relays' stream between the hosts, re-attaching
            # after any broken link, so neither CRIU process ever sees its connection close.
            if not dumped.get("relay"):
                raise OperationFailed(f"{self.source.name}'s agent did not start a page relay.")
            listening = dumped.get("direct_pages") or {}
            if self.xfer.keys is not None and not isinstance(listening.get("port"), int):
                self.xfer.pages_fell_back(f"{self.source.name}: {listening.get('error') or 'no port'}")
                ctx.remember(transfer=self.xfer.describe())
            if self.xfer.keys is not None:
                # The target's relay connects to the source's over TLS (migrate-restore's
                # parameters); nothing of the pages crosses this worker.
                self.direct_port = listening["port"]
                self.tunnel = DirectPages()
                p.event(
                    "dump",
                    f"the page relay on {self.source.name} waits for {self.target.name}'s over TLS on port "
                    f"{self.direct_port}",
                    "dump",
                    1,
                )
            else:
                self.start_pump(gated=True)
                p.event(
                    "dump", f"the page server on {self.source.name} serves through its page relay (no port)", "dump", 1
                )
        self.clock.lap("dump")
        ctx.check_cancel()

    def start_pump(self, gated: bool = False) -> None:
        """The pages through this worker: its pump between both hosts' page relays. `gated`: its
        links open now, its rounds wait for open_pump() (the target's relay, started by the restore)."""
        if not isinstance(self.tunnel, ssh.PagePump):
            self.tunnel = ssh.PagePump(self.source, self.target, self.base, gated=gated).start()
            self.hosts.callback(self.tunnel.stop)
        elif not gated:
            self.tunnel.open_gate()

    def open_pump(self, msg: dict | None = None) -> None:
        """The restore's event that its page relay is up (or, with no event, the restore's end)."""
        if isinstance(self.tunnel, ssh.PagePump) and (msg is None or msg.get("pages_ready")):
            self.tunnel.open_gate()

    def transfer(self) -> None:
        """What changed since the copy, and the memory images."""
        p, src, dst, base, xfer = self.progress, self.src, self.dst, self.base, self.xfer
        t0 = time.monotonic()
        got = send(src, dst, p, "delta", {**base, "what": "delta"}, "rootfs changes", xfer, self.warmed.get("delta"))
        self.delta = rootfs_delta(got, (time.monotonic() - t0) * 1000)
        p.event("transfer", self.delta["sentence"], "delta", 1.0)
        if self.live:
            send(src, dst, p, "images", {**base, "what": "images"}, "memory images", xfer, self.warmed.get("images"))
        self.clock.lap("transfer")
        self.ctx.check_cancel()

    def restore(self) -> None:
        """Run it on the target. From the moment it runs there, a cancel is too late."""
        p, dst, base, name = self.progress, self.dst, self.base, self.container.name
        if self.live:
            p.event("restore", f"restoring {name} on {self.target.name}", "restore")
            params, on_event = (
                ({**base, "lazy": True, "read_ahead": settings.PAGE_READ_AHEAD} if self.lazy else base),
                self.open_pump if self.lazy else None,
            )
            if self.lazy and self.xfer.keys is not None:
                params["direct_pages"] = self.xfer.direct_pages_target(self.direct_port)

                def on_event(msg: dict) -> None:
                    # The target's relay could not link to the source's: the pages go through
                    # this worker instead, before the restored processes need them.
                    if msg.get("page_path") == "ssh-relay":
                        self.start_pump()

            try:
                self.restored, self.restored_at = call_timed(
                    dst, p, "restore", "migrate-restore", params, on_event, self.prestarted
                )
            finally:
                self.open_pump()  # whatever the restore said: a pump never waits for nothing
            if self.lazy and self.xfer.keys is not None and self.restored.get("page_path") != "direct-tls":
                self.start_pump()
                self.xfer.pages_fell_back(f"{self.target.name}: {self.restored.get('page_path_why')}")
                self.ctx.remember(transfer=self.xfer.describe())
        elif self.was_running:
            p.event("restore", f"starting {name} on {self.target.name}", "restore")
            call(dst, p, "restore", "start", {"name": name})
        # Until the restore's result line arrived (live), not until its channel closed and the
        # fallbacks above were recorded: the container ran from then.
        end = self.restored_at if self.live and self.restored_at else time.monotonic()
        self.downtime_ms = (end - self.down_from) * 1000 if self.was_running else 0
        if self.live:  # the restore call then waited for the first new TCP data: it ran already
            self.downtime_ms = max(self.downtime_ms - served_wait_s(self.restored) * 1000, 0.0)
        self.clock.lap("restore")

    def pages(self) -> None:
        """Post-copy: it runs on the target now; the record follows it, whatever happens to
        the pages, and the target pulls them."""
        ctx, container = self.ctx, self.container
        move_record(ctx, container, self.target, self.was_running)
        self.progress.event(
            "pages", f"{container.name} runs on {self.target.name}; pulling its memory from {self.source.name}", "pull"
        )
        self.pulled, self.stats, src2, dst2 = pull_pages(
            self.progress, self.src, self.dst, container, self.base, self.tunnel, self.stats
        )
        for conn in {src2, dst2} - {self.src, self.dst}:  # made again after a broken link
            self.hosts.callback(conn.close)
        self.src, self.dst = src2, dst2
        self.clock.lap("pages")

    def cleanup(self) -> None:
        """The target runs it: the source copy can go, and the records follow the container."""
        ctx, p, base = self.ctx, self.progress, self.base
        if not self.lazy:  # a post-copy's record followed it when it began running there (pages)
            move_record(ctx, self.container, self.target, self.was_running)
        p.event("cleanup", f"removing the source copy on {self.source.name}", "cleanup-source")
        try:
            call(self.src, p, "cleanup-source", "migrate-cleanup", {**base, "remove": True})
        except OperationFailed as e:
            ctx.event("cleanup", f"the source copy could not be removed (it is stopped): {e.message}")
        try:  # the target's working files: the images it restored from, the page daemon's logs
            call(self.dst, p, "cleanup-target", "migrate-cleanup", {**base, "remove": False})
        except OperationFailed as e:
            ctx.event(
                "cleanup", f"the migration's working files on {self.target.name} could not be removed: {e.message}"
            )
        self.clock.lap("cleanup")

    def client_downtime(self) -> dict:
        if self.live:
            seen = client_downtime(
                self.dumped, self.dumped_at, self.restored, self.restored_at, self.source.name, self.target.name
            )
            if self.lazy and seen["ms"] is not None and not seen["until"].startswith("its processes"):
                seen["note"] = (
                    "post-copy: its processes fetch their memory from the source as they touch it, so a service's "
                    "first answers may come later than its address's"
                )
            return seen
        why = "measured for live migrations (stop-and-copy, post-copy) only"
        return {"ms": None, "from": None, "until": None, "why": why if self.was_running else "it was not running"}

    def result(self) -> dict:
        ctx, xfer = self.ctx, self.xfer
        seen = self.client_downtime()
        result = {
            "strategy": self.strategy,
            "why": ctx.op.params.get("why"),
            "source": self.source.name,
            "target": self.target.name,
            "downtime_ms": round(self.downtime_ms, 1),
            "client_downtime_ms": seen["ms"],
            "client_downtime": seen,
            "total_ms": round((time.monotonic() - self.clock.t0) * 1000, 1),
            "bytes_transferred": xfer.bytes,
            # The migration's data that crossed the dashboard (relayed tars, post-copy pages and
            # page requests); the agents' JSON lines (control) are not counted.
            "dashboard_bytes": xfer.relayed,
            "presync_bytes": self.presync_bytes,
            "rootfs_delta": self.delta,
            "phases": self.clock.marks,
            "dump_stats": self.stats,
            "restore_stats": self.restored.get("stats") or {},
            "transport": xfer.sentence(),
            "transfer": xfer.describe(),
        }
        if ctx.cancel_requested():
            result["cancel"] = (
                f"asked for after {self.container.name} ran on {self.target.name}: too late, so the migration finished"
            )
        if self.lazy:
            tunnel = self.tunnel
            result["pages_ms"] = self.pulled.get("ms")
            result["page_bytes"] = tunnel.bytes_down
            result["page_relay"] = {
                # "direct-tls" (host to host) or "ssh-relay" (through this worker's pump)
                "path": "direct-tls" if isinstance(tunnel, DirectPages) else "ssh-relay",
                "encrypted": True,
                "rounds": tunnel.rounds,
                "bytes_up": tunnel.bytes_up,
                "relay": self.pulled.get("relay"),
            }
            result["bytes_transferred"] += tunnel.bytes_down + tunnel.bytes_up
            if not isinstance(tunnel, DirectPages):
                result["dashboard_bytes"] += tunnel.bytes_down + tunnel.bytes_up
        return result
