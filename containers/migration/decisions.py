"""An admin's decision on a waiting migration: each action it may offer, carried out."""

from __future__ import annotations

from contextlib import ExitStack

from hosts import ssh
from operations.events import publish_fleet
from operations.runner import OperationContext, OperationFailed, WaitFor, decision_handler

from ..models import Container
from .common import call, db_write, supersede_target
from .phases import RESUME_DECISION, Progress
from .postcopy import POSTCOPY_RESUME, lazy_resume_on_source, postcopy_actions
from .rollback import RESUME_SOURCE, unreachable_target_actions

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
    progress = Progress.rest_of(ctx, RESUME_DECISION)
    target = op.target_host.name if op.target_host else "the target"
    try:
        with ExitStack() as hosts:
            src = hosts.enter_context(ssh.connect(source))
            dst = None
            if op.target_host is not None:
                try:
                    dst = hosts.enter_context(ssh.connect(op.target_host))
                except ssh.SSHError as e:
                    ctx.event("decision", f"{target} cannot be reached ({e}): its copy is dealt with later")
            # The target's copy first: never two copies running, not even for a moment.
            target_clean = supersede_target(ctx, dst, progress, base, target)
            if live:
                data = call(src, progress, "resume-source", "migrate-resume", base)
            else:
                data = call(src, progress, "resume-source", "start", {"name": container.name})
            try:
                call(src, progress, "cleanup-source", "migrate-cleanup", {**base, "remove": False})
            except OperationFailed as e:
                ctx.event(
                    "cleanup", f"the migration's working files on {source.name} could not be removed: {e.message}"
                )
    except (ssh.SSHError, OperationFailed) as e:
        raise WaitFor(
            f"{source.name} could not resume {container.name} ({e}); ctweb asks the hosts again.",
            unreachable_target_actions(source.name, op.target_host.name if op.target_host else "the target", live),
        ) from e
    db_write(lambda: Container.objects.filter(pk=container.pk).update(host=source, state=data.get("state", "RUNNING")))
    publish_fleet("container", {"name": container.name, "host": source.name, "state": data.get("state", "RUNNING")})
    left = (
        f"nothing is left on {target}"
        if target_clean
        else f"what this migration left on {target} is removed when ctweb next reaches it"
    )
    raise OperationFailed(f"Rolled back by an admin's decision: {container.name} was resumed on {source.name}; {left}.")


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
