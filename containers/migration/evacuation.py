"""Evacuation: every container of a host moved elsewhere, one migration each (its children),
the evacuation waiting for them without holding a thread."""

from __future__ import annotations

from django.db import transaction

from core.api import ApiError
from core.audit import Actor, audit
from hosts.models import Host
from operations.models import Operation
from operations.runner import Cancelled, OperationContext, OperationFailed, WaitFor, enqueue, finish, handler

from .phases import EVACUATION, Progress
from .preflight import start_migration


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
    progress = Progress(ctx, EVACUATION)
    progress.event(
        "preflight", f"{len(containers)} container(s) to move from {source.name} to {len(targets)} host(s)", "plan", 1.0
    )
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
            progress.event(
                "migrate", f"{container.name} -> {target.name}: operation {child.pk}", "start", 1.0, child=child.pk
            )
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
