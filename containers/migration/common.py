"""What the parts of a migration share: the one way they call an agent on a connection they
hold open, the record that follows the container, and the words for times."""

from __future__ import annotations

from datetime import UTC, datetime

from django.db import DatabaseError, transaction
from django.utils import timezone

from hosts import ssh
from hosts.handlers import failure
from operations.events import publish_fleet
from operations.models import Operation
from operations.runner import OperationContext, OperationFailed, WaitFor

from ..models import Container
from .phases import Progress


def call(conn: ssh.HostConnection, progress: Progress, step: str, sub: str, params: dict) -> dict:
    """Run an agent subcommand on an open connection, its progress as `step`'s own fraction;
    an SSH or agent error becomes the operation's sentence through the one door
    (hosts.handlers.failure), named after the host."""
    return call_timed(conn, progress, step, sub, params)[0]


def call_timed(
    conn: ssh.HostConnection, progress: Progress, step: str, sub: str, params: dict, also=None, prestarted=None
) -> tuple[dict, float]:
    """`call`, and when the agent's result line arrived (this worker's monotonic clock).
    `also(event)` sees each of the agent's events too; `prestarted`: its agent, started ahead."""
    relay = progress.relay(step)

    def on_event(msg: dict) -> None:
        relay(msg)
        if also is not None:
            also(msg)

    try:
        r = conn.run_agent(sub, params, on_event=on_event, **({"prestarted": prestarted} if prestarted else {}))
    except ssh.SSHError as e:
        raise failure(e, prefix=f"{conn.host.name}: ", on=conn.host.name) from e
    return r.data, r.received_at


def move_record(ctx: OperationContext, container: Container, target, was_running: bool) -> None:
    """The record follows the container to the target that runs it (an operation waits if the
    database cannot be written: the recovery asks the hosts again and writes it then)."""
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


def db_write(fn):
    try:
        return fn()
    except DatabaseError as e:
        raise WaitFor(f"The database could not be written ({type(e).__name__}); ctweb asks the hosts again.") from e


def now_iso() -> str:
    return timezone.now().isoformat()


def hms(iso: str | None) -> str:
    """'HH:MM:SS UTC' of an ISO time (what the admin sees in an action's label)."""
    try:
        return datetime.fromisoformat(iso).astimezone(UTC).strftime("%H:%M:%S UTC")
    except (TypeError, ValueError):
        return "the dump"


def duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def supersede_target(ctx: OperationContext, dst, progress: Progress, base: dict, target: str) -> bool:
    """Before an admin's "resume on the source": the target's copy is removed now if the target
    answers (migrate-abort: only what this migration brought, a running copy stopped first, as
    the action's consequence says), and the migration records it superseded either way, before
    the source runs: a copy left on an unreachable target is never resumed nor followed by the
    record, and the tidy removes it once the source's copy is confirmed running
    (handlers.tidy_migrations). True when the target is confirmed clean."""
    clean = False
    if dst is not None:
        try:
            call(dst, progress, "abort-target", "migrate-abort", base)
            clean = True
        except OperationFailed as e:
            ctx.event("cleanup", f"the copy on {target} could not be removed now: {e.message}")
    ctx.remember(superseded={"host": target, "clean": clean, "at": now_iso()})
    return clean
