"""Post-copy after the restore: the page pull (no limit of time, only a limit without
progress), what an admin may decide when it stops, the pull going on after a lost worker or
a wait, and the container given back to its source's frozen tasks. See docs/RELIABILITY.md,
"Post-copy: where the state lives"."""

from __future__ import annotations

import time

from core.models import FleetSettings
from hosts import ssh
from operations.events import publish_fleet
from operations.runner import KEEP_WAITING, OperationFailed, WaitFor

from ..models import Container
from .common import call, db_write, duration, hms, move_record, supersede_target
from .phases import FINISH_PULL, LAZY_RESUME, Progress
from .rollback import roll_back


def stall_limit_s() -> float:
    """How long a page pull may go without any progress before it is given up (and left
    for an admin: nothing is removed). No limit on the pull's total time."""
    return float(FleetSettings.load().postcopy_stall_limit_s)


class DirectPages:
    """The page path when the two hosts' page relays are linked directly over TLS (an admin
    allowed direct transfer): nothing of the pages crosses this worker, which only reads the
    relays' counters (migrate-lazy-wait) for progress. The same face as ssh.PagePump."""

    path = "direct-tls"

    def __init__(self):
        self.bytes_down = 0  # pages, source -> target
        self.bytes_up = 0  # the target's requests
        self.rounds = 0  # TLS connections the relays made (1 without a break)
        self.errors: list[str] = []
        self.last_progress = time.monotonic()

    def observe(self, role: str, relay: dict) -> None:
        """A relay's counters (its status): bytes from the peer, and the direct link's state."""
        moved, acked = relay.get("from_peer"), relay.get("acked_by_peer")
        if not isinstance(moved, int) or not isinstance(acked, int):
            return
        # Pages: what the target received, or what it acknowledged to the source; requests
        # the other way round.
        down, up = (moved, acked) if role == "target" else (acked, moved)
        if down > self.bytes_down or up > self.bytes_up:
            self.last_progress = time.monotonic()
        self.bytes_down, self.bytes_up = max(self.bytes_down, down), max(self.bytes_up, up)
        direct = relay.get("direct") or {}
        if isinstance(direct.get("connects"), int):
            self.rounds = max(self.rounds, direct["connects"])
        if direct.get("error") and (not self.errors or not self.errors[-1].endswith(str(direct["error"]))):
            self.errors.append(f"{time.strftime('%H:%M:%S')} {role}: {direct['error']}")
            del self.errors[:-50]

    def stop(self) -> None:
        pass


def page_path(op, source, target, base) -> ssh.PagePump | DirectPages:
    """After a lost worker or a wait: the pages go on the way the migration's relays took."""
    if ((op.result or {}).get("transfer") or {}).get("pages") == "direct-tls":
        return DirectPages()
    return ssh.PagePump(source, target, base).start()


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


def pull_pages(
    progress: Progress, src, dst, container, base, pump: ssh.PagePump | DirectPages, stats: dict
) -> tuple[dict, dict, object, object]:
    """Wait, with no limit of time, until the target holds every page (its lazy-pages daemon
    ended with success) and the source's page server has finished. Broken links are
    waited through (the pump re-attaches, the calls reconnect); only a stretch of
    stall_limit_s() without any progress stops the pull: both copies are kept and the
    operation waits for an admin's decision (postcopy_actions), nothing is removed. Its
    progress: the steps "pull" (the target's wait) and "finish" (the source's)."""
    ctx = progress.ctx
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
                if isinstance(pump, DirectPages):
                    pump.observe(role, relay)
                if r.get("done"):
                    if role == "target":
                        out = {**r, "ms": round((time.monotonic() - t0) * 1000, 1)}
                    else:
                        stats = r.get("stats") or stats
                    break
            except ssh.AgentFailed as e:
                if role == "target" and "ended" in (e.data or {}):
                    target_lost(ctx, src, dst, container, base, f"{target.name}: {e}", e.details)
                raise OperationFailed(
                    f"{container.name}'s memory pull stopped: {links[role].host.name}: {e}", e.details
                ) from e
            except ssh.SSHError as e:
                unreachable[links[role].host.name] = str(e)
                ctx.event("pages", f"{links[role].host.name} cannot be reached ({e}); waiting for it", None)
                time.sleep(2)
            moved = (relay.get("from_peer"), relay.get("from_criu"))
            now = time.monotonic()
            if relay and moved != seen:
                seen, last = moved, now
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
                    f"{container.name}'s memory pull made no progress for {duration(limit)} ({why}), so it was "
                    f"stopped: {container.name} stays frozen on {source.name} with all its pages (the state of "
                    f"{hms(ctx.op.result.get('frozen_at'))}), and the partial copy on {target.name} is kept; "
                    "nothing was removed. An admin chooses what happens next.",
                    postcopy_actions(ctx.op, source.name, target.name),
                )
            if now - told >= 2:
                told = now
                progress.event(
                    "pages",
                    f"{'pulling' if role == 'target' else 'finishing'}: {pump.bytes_down / 1048576:.1f} MiB of pages "
                    f"so far, {pump.rounds} {'TLS connection(s) host to host' if isinstance(pump, DirectPages) else 'link round(s)'}",
                    "pull" if role == "target" else "finish",
                    bytes=pump.bytes_down,
                )
    return out, stats, links["source"].live(), links["target"].live()


POSTCOPY_RESUME = "postcopy-resume-source"


def postcopy_actions(op, source: str, target: str, can_resume: bool = True) -> list[dict]:
    """What an admin may do with a post-copy stopped mid-pull (the target gone, both hosts
    unreachable, or no progress for the stall limit): the exact actions and what follows."""
    name = op.container_name or "the container"
    at = hms(op.result.get("frozen_at"))
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
    progress = Progress.rest_of(ctx, FINISH_PULL)
    move_record(ctx, container, target, True)
    pump = page_path(ctx.op, source, target, base)
    try:
        _, _, src2, dst2 = pull_pages(progress, src, dst, container, base, pump, {})
    finally:
        pump.stop()
    src, dst = src2, dst2
    call(src, progress, "cleanup-source", "migrate-cleanup", {**base, "remove": True})
    call(dst, progress, "cleanup-target", "migrate-cleanup", {**base, "remove": False})
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


def target_lost(ctx, src, dst, container, base, why: str, details: str = "") -> None:
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
    db_write(lambda: Container.objects.filter(pk=container.pk).update(host=source))
    container.refresh_from_db()
    if not force:
        actions = postcopy_actions(ctx.op, source.name, ctx.op.target_host.name if ctx.op.target_host else "the target")
        roll_back(ctx, src, dst, container, base, True, True, True, failure, waiting_actions=actions)
        return
    op = ctx.op
    progress = Progress.rest_of(ctx, LAZY_RESUME)
    target = op.target_host.name if op.target_host else "the target"
    at = hms(op.result.get("frozen_at"))
    # Before the source runs, so that whatever happens next the target's copy is known to be
    # stale (never resumed, never followed by the record).
    target_clean = supersede_target(ctx, dst, progress, base, target)
    progress.event("decision", f"resuming {container.name} on {source.name} from the state of {at}", "resume-source")
    try:
        data = src.run_agent("migrate-resume", base, on_event=progress.relay("resume-source")).data
    except ssh.AgentFailed as e:  # the source's word: its frozen state is gone
        said = e.data.get("state") if isinstance(e.data, dict) else None
        now = said if said in Container.State.values else Container.State.STOPPED  # the host's word, if it gave one
        db_write(lambda: Container.objects.filter(pk=container.pk).update(state=now))
        failure.message = (
            f"{container.name} could not be resumed on {source.name} ({e}); it is {now} there. The copy on "
            f"{target} is kept as it is (it is removed only once a copy is confirmed running)."
        )
        failure.details = e.details
        return
    try:  # it runs from its tasks again: the relay and the working files can go
        call(src, progress, "cleanup-source", "migrate-cleanup", {**base, "remove": False})
    except OperationFailed as e:
        ctx.event("cleanup", f"the migration's working files on {source.name} could not be removed: {e.message}")
    state = data.get("state", "RUNNING")
    db_write(lambda: Container.objects.filter(pk=container.pk).update(host=source, state=state))
    container.refresh_from_db()
    publish_fleet("container", {"name": container.name, "host": source.name, "state": state})
    never_stopped = "never stopped" in str(data.get("resumed", ""))
    failure.message = (
        f"Rolled back by an admin's decision: {container.name} was never stopped on {source.name} (the link "
        f"broke before its dump began) and runs on there; nothing of it ran on {target}. "
        if never_stopped
        else f"Rolled back by an admin's decision: {container.name} was resumed on {source.name} from the state "
        f"of {at}; what ran on {target} since is lost. "
    ) + (
        f"The copy on {target} was removed."
        if target_clean
        else f"The partial copy on {target} is never resumed: it is stopped and removed when {target} answers again."
    )
