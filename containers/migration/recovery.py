"""A migration whose worker died in the middle of it (runner.mark_lost_operations): the
hosts are asked where it stopped (the agent's `inspect` takes the container's lock, so it
first waits for any step still running there), then the container is put in one place, in
a known state: rolled forward where the target runs it, the page pull going on where a
post-copy's relays held on, else rolled back. An unreachable host is never taken for an
answer: the operation waits and asks again."""

from __future__ import annotations

from contextlib import ExitStack

from hosts import ssh
from operations.runner import OperationContext, OperationFailed, WaitFor, recovers

from ..handlers import where
from .common import call, move_record
from .evacuation import check_evacuation
from .phases import RECOVERY, Progress
from .postcopy import finish_lost_pull, lazy_resume_on_source, page_path, postcopy_actions
from .rollback import roll_back


@recovers("migrate")
def recover_migration(ctx: OperationContext) -> str:
    op = ctx.op
    container, source, target = op.container, op.host, op.target_host
    if container is None or source is None or target is None:
        return "Its container or one of its hosts no longer exists: there was nothing to recover."
    strategy = op.params.get("strategy")
    live, lazy = strategy in ("stop-and-copy", "post-copy"), strategy == "post-copy"
    base = {"name": container.name, "migration": op.pk}
    progress = Progress.rest_of(ctx, RECOVERY)
    with ExitStack() as hosts:
        try:
            src = hosts.enter_context(ssh.connect(source))
        except ssh.SSHError as e:  # unknown is not "not committed": ask again later
            actions = None
            if lazy and op.result.get("stopping"):  # a post-copy's decision stays on offer meanwhile
                actions = postcopy_actions(op, source.name, target.name)
            raise WaitFor(
                f"{source.name}, where {container.name} was, cannot be reached ({e}); ctweb asks again.", actions
            ) from e
        try:
            dst = hosts.enter_context(ssh.connect(target))
        except ssh.SSHError as e:
            ctx.event("recovery", f"{target.name} cannot be reached: {e}")
            dst = None
        try:
            s = call(src, progress, "inspect-source", "inspect", {**base, "thaw": True})
        except OperationFailed as e:
            raise WaitFor(
                f"{source.name} could not say how {container.name} is ({e.message}); ctweb asks again."
            ) from e
        t = None
        if dst:
            # A post-copy's restore cut off with its worker waits on the target for pages, holding
            # the container's lock there, and the target's `inspect` waits for that lock: the
            # pages are served meanwhile (the source's frozen tasks hold them all), so the restore
            # can end and the target answer, instead of both waiting out the restore's limit.
            serving = lazy and op.result.get("stopping") and s["migration"]["lazy_dump_running"]
            pump = page_path(op, source, target, base) if serving else None
            try:
                t = call(dst, progress, "inspect-target", "inspect", base)
            except OperationFailed as e:
                ctx.event("recovery", f"{target.name} could not say how {container.name} is there: {e.message}")
                dst = None
            finally:
                if pump is not None:
                    pump.stop()
        progress.event(
            "recovery", f"{source.name}: {s}; {target.name}: {t if t else 'unreachable'}", "inspect-target", 1
        )
        was_running = op.result.get("was_running")
        if was_running is None:  # lost before its preflight ended: nothing had been stopped yet
            was_running = s["state"] == "RUNNING"
        if lazy and s["migration"]["lazy_dump"] and op.result.get("stopping"):
            held = s["migration"]["lazy_dump_running"]  # the source's frozen tasks with every page
            if t is None and (held or s["state"] != "RUNNING"):
                # The target may run it with part of its pages, or be gone: nothing is guessed,
                # nothing removed. The operation waits; an admin may decide.

                raise WaitFor(
                    f"{target.name} cannot be reached during {container.name}'s post-copy: "
                    + (
                        f"{container.name} stays frozen on {source.name} with all its pages, and whatever {target.name} "
                        "holds is kept; nothing was removed. ctweb asks again; an admin may decide."
                        if held
                        else f"{source.name}'s page server has ended, so {target.name} may hold every page; ctweb asks "
                        "again."
                    ),
                    postcopy_actions(op, source.name, target.name, can_resume=held),
                )
            if t is not None and held and not (t["exists"] and t["state"] == "RUNNING"):
                # The target answers without a running copy (its host crashed and came back):
                # that copy is dead, the source's frozen state is the container. (A running
                # copy goes on below: finish_lost_pull asks its lazy-pages daemon, and gives
                # it up for the source only if that daemon died.)

                failure = OperationFailed(f"{target.name} no longer runs {container.name}'s restored copy.")
                lazy_resume_on_source(ctx, src, dst, container, base, failure)
                return f"Rolled back. {failure.message.strip()} {where(container)}"
        if t and t["exists"] and t["state"] == "RUNNING" and t["migration"]["received"]:
            # The target had restored it: roll forward.
            if lazy and (s["migration"]["lazy_dump_running"] or t["migration"]["lazy_pages_running"]):
                # The page relays held on: continue the pull.
                return finish_lost_pull(ctx, src, dst, container, base)
            move_record(ctx, container, target, was_running)
            call(
                dst, progress, "cleanup-target", "migrate-cleanup", {**base, "remove": False}
            )  # the images it restored from
            removed = False
            if s["exists"] and s["state"] == "STOPPED":
                call(src, progress, "cleanup-source", "migrate-cleanup", {**base, "remove": True})
                removed = True
            return f"{container.name} had been restored on {target.name} before the worker was lost: it runs there " + (
                f"now, and the copy on {source.name} was removed." if removed else "now."
            )
        # Roll back: the target gives up what it received; the source keeps the container.
        committed = bool(was_running and s["exists"] and s["state"] != "RUNNING")
        failure = OperationFailed("")
        actions = postcopy_actions(op, source.name, target.name) if lazy and op.result.get("stopping") else None
        roll_back(ctx, src, dst, container, base, committed, live, was_running, failure, waiting_actions=actions)
        return f"Rolled back. {failure.message.strip()} {where(container)}".replace("  ", " ")


@recovers("evacuate", failure_is_outcome=True)
def recover_evacuation(ctx: OperationContext):
    return check_evacuation(ctx)
