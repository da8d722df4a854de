"""What happens to an operation whose worker died in the middle of it.

The worker that notices (runner.mark_lost_operations) keeps the row running and asks
the hosts where the job stopped: the agent's `inspect` takes the container's lock, so
it first waits for any step still running there (an agent whose dashboard went away
finishes its step; a dump keeps the lock until CRIU exits). Then the container is put
in one place, in a known state, and the row ends with what was found and done.
"""

from __future__ import annotations

from contextlib import ExitStack

from hosts import ssh
from operations.runner import OperationContext, OperationFailed, WaitFor, recovers

from .handlers import agent, agent_or_wait, record_snapshot, set_state
from .handlers import restore as run_restore
from .migration import (
    _agent,
    _move_record,
    _roll_back,
    check_evacuation,
    finish_lost_pull,
    lazy_resume_on_source,
    postcopy_actions,
)
from .models import Container


def _where(container: Container) -> str:
    container.refresh_from_db()
    saved = " with its memory saved (Start resumes it)" if container.has_saved_state else ""
    return f"{container.name} is {container.state} on {container.host.name}{saved}."


@recovers("migrate")
def recover_migration(ctx: OperationContext) -> str:
    op = ctx.op
    container, source, target = op.container, op.host, op.target_host
    if container is None or source is None or target is None:
        return "Its container or one of its hosts no longer exists: there was nothing to recover."
    strategy = op.params.get("strategy")
    live, lazy = strategy in ("stop-and-copy", "post-copy"), strategy == "post-copy"
    base = {"name": container.name, "migration": op.pk}
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
            s = _agent(src, ctx, "inspect", {**base, "thaw": True}, 10, 10)
        except OperationFailed as e:
            raise WaitFor(
                f"{source.name} could not say how {container.name} is ({e.message}); ctweb asks again."
            ) from e
        t = None
        if dst:
            try:
                t = _agent(dst, ctx, "inspect", base, 20, 10)
            except OperationFailed as e:
                ctx.event("recovery", f"{target.name} could not say how {container.name} is there: {e.message}")
                dst = None
        ctx.event("recovery", f"{source.name}: {s}; {target.name}: {t if t else 'unreachable'}", 30)
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
                return f"Rolled back. {failure.message.strip()} {_where(container)}"
        if t and t["exists"] and t["state"] == "RUNNING" and t["migration"]["received"]:
            # The target had restored it: roll forward.
            if lazy and (s["migration"]["lazy_dump_running"] or t["migration"]["lazy_pages_running"]):
                # The page relays held on: continue the pull.
                return finish_lost_pull(ctx, src, dst, container, base)
            _move_record(ctx, container, target, was_running)
            _agent(dst, ctx, "migrate-cleanup", {**base, "remove": False}, 70, 10)  # the images it restored from
            removed = False
            if s["exists"] and s["state"] == "STOPPED":
                _agent(src, ctx, "migrate-cleanup", {**base, "remove": True}, 80, 10)
                removed = True
            return f"{container.name} had been restored on {target.name} before the worker was lost: it runs there " + (
                f"now, and the copy on {source.name} was removed." if removed else "now."
            )
        # Roll back: the target gives up what it received; the source keeps the container.
        committed = bool(was_running and s["exists"] and s["state"] != "RUNNING")
        failure = OperationFailed("")
        _roll_back(ctx, src, dst, container, base, committed, live, was_running, failure)
        return f"Rolled back. {failure.message.strip()} {_where(container)}".replace("  ", " ")


@recovers("evacuate", failure_is_outcome=True)
def recover_evacuation(ctx: OperationContext):
    return check_evacuation(ctx)


@recovers("snapshot")
def recover_snapshot(ctx: OperationContext) -> str:
    op = ctx.op
    container = op.container
    if container is None or op.host is None:
        return "Its container no longer exists: there was nothing to recover."
    snap = op.params.get("snapshot")
    params = {"name": container.name, "snapshot": snap, "thaw": True}
    seen = agent_or_wait(ctx, op.host, "inspect", params, 10, 40, f"{op.host.name} is asked again until it answers.")
    set_state(container, seen["state"] or Container.State.UNKNOWN)
    meta = seen.get("snapshot")
    if meta and not container.snapshots.filter(name=snap).exists():
        # It was taken; only its result was lost with the worker. Record it as it is.
        contents = {}
        if meta.get("stateful"):
            try:
                contents = agent(ctx, op.host, "snapshot-contents", {"name": container.name, "snapshot": snap}, 60, 30)
            except OperationFailed as e:
                ctx.event("recovery", f"could not read the snapshot's contents: {e.message}")
        record_snapshot(op, container, snap, bool(meta.get("stateful")), meta, contents.get("contents") or {})
        op.result["recovered_snapshot"] = snap
        return f"Snapshot {snap} had been completed on {op.host.name}: it is recorded. {_where(container)}"
    thawed = " It was left frozen and has been thawed." if seen.get("thawed") else ""
    return f"No snapshot {snap} was kept (an unfinished copy is removed).{thawed} {_where(container)}"


@recovers("restore", "start", "stop", "restart")
def recover_state_change(ctx: OperationContext) -> str:
    op = ctx.op
    container = op.container
    if container is None or op.host is None:
        return "Its container no longer exists: there was nothing to recover."
    params = {"name": container.name, "thaw": True}
    seen = agent_or_wait(ctx, op.host, "inspect", params, 10, 80, f"{op.host.name} is asked again until it answers.")
    set_state(container, seen["state"] or Container.State.UNKNOWN, has_saved_state=bool(seen.get("has_saved_state")))
    snap = (op.params or {}).get("snapshot")
    if op.kind == "restore" and seen["state"] != Container.State.RUNNING and snap:
        # The restore stopped half-way (its agent died or its answer was lost while it rolled the
        # rootfs back): the container does not run, but its whole state is still in the snapshot,
        # and a restore may be run again from the start. So it is, rather than leaving it stopped.
        ctx.event("recovery", f"The restore was interrupted; {container.name} is restored again from {snap}.", 85)
        data = run_restore(ctx)
        return {**(data or {}), "recovered": f"The restore was interrupted and run again from {snap}."}
    return f"Its host says: {_where(container)}"
