"""What happens to an operation whose worker died in the middle of it.

The worker that notices (runner.mark_lost_operations) keeps the row running and asks
the hosts where the job stopped: the agent's `inspect` takes the container's lock, so
it first waits for any step still running there (an agent whose dashboard went away
finishes its step; a dump keeps the lock until CRIU exits). Then the container is put
in one place, in a known state, and the row ends with what was found and done.
A migration's (and an evacuation's) recovery is in the migration package
(containers/migration/recovery.py).
"""

from __future__ import annotations

from operations.runner import OperationContext, OperationFailed, recovers

from .handlers import agent, agent_or_wait, record_snapshot, set_state, where
from .handlers import restore as run_restore
from .models import Container


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
        return f"Snapshot {snap} had been completed on {op.host.name}: it is recorded. {where(container)}"
    thawed = " It was left frozen and has been thawed." if seen.get("thawed") else ""
    return f"No snapshot {snap} was kept (an unfinished copy is removed).{thawed} {where(container)}"


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
    return f"Its host says: {where(container)}"
