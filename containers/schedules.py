"""Snapshot schedules: a snapshot every N minutes/hours/days, stateful or not, and the retention
that deletes a schedule's older snapshots (keep the last K and/or those younger than D days).

Celery beat calls `run_schedules` every 30 s. Everything a schedule does is an ordinary
operation started through the services (a snapshot, a delete-snapshot), on the container's
one-operation-at-a-time rule: a container busy with another operation is skipped until the
next tick, so retention never deletes a snapshot an operation is using. Retention deletes only the schedule's own snapshots,
never one a person took, and one per container per tick."""

from __future__ import annotations

import datetime as dt
import logging

from django.db import transaction
from django.utils import timezone

from core.api import ApiError
from core.audit import Actor, audit

from .models import Container, Snapshot, SnapshotSchedule
from .services import active_operation, delete_snapshot, snapshot_container

log = logging.getLogger(__name__)

UNIT_SECONDS = {"minutes": 60, "hours": 3600, "days": 86400}
MOST = {"minutes": 60 * 24 * 366, "hours": 24 * 366, "days": 366}  # at most about a year
KEEP_MOST = 10000


def interval(schedule: SnapshotSchedule) -> dt.timedelta:
    return dt.timedelta(seconds=schedule.every * UNIT_SECONDS[schedule.unit])


def _whole(value, field: str, lo: int, hi: int, allow_none: bool = False) -> int | None:
    if value is None or value == "":
        if allow_none:
            return None
        raise ApiError(f"{field} is required: a whole number from {lo} to {hi}.", 400, field)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:  # JSON's own types only
        raise ApiError(f"{field} must be a whole number from {lo} to {hi}.", 400, field)
    return value


def clean(data: dict) -> dict:
    """The schedule as a request gave it -> its fields, or ApiError naming the bad one."""
    unit = data.get("unit")
    if not isinstance(unit, str) or unit not in UNIT_SECONDS:  # {} or [] must not reach a dict lookup
        raise ApiError("unit must be minutes, hours or days.", 400, "unit")
    every = _whole(data.get("every"), "every", 1, MOST[unit])
    stateful = data.get("stateful", True)
    if not isinstance(stateful, bool):  # JSON's true or false (the page's form sends a bool too)
        raise ApiError("stateful must be true or false.", 400, "stateful")
    keep_last = _whole(data.get("keep_last"), "keep_last", 1, KEEP_MOST, allow_none=True)
    keep_days = _whole(data.get("keep_days"), "keep_days", 1, 3660, allow_none=True)
    return {"every": every, "unit": unit, "stateful": stateful, "keep_last": keep_last, "keep_days": keep_days}


def describe(s: SnapshotSchedule) -> str:
    keep = []
    if s.keep_last:
        keep.append(f"the last {s.keep_last}")
    if s.keep_days:
        keep.append(f"{s.keep_days} day{'s' if s.keep_days != 1 else ''}")
    unit = s.unit[:-1] if s.every == 1 else s.unit
    return (
        f"every {s.every} {unit}, {'stateful' if s.stateful else 'stateless'}, "
        f"keeping {' or '.join(keep) if keep else 'every snapshot'}"
    )


def create_schedule(actor: Actor, container: Container, data: dict) -> SnapshotSchedule:
    fields = clean(data if isinstance(data, dict) else {})
    schedule = SnapshotSchedule(container=container, created_by=actor.user, **fields)
    schedule.next_run_at = timezone.now() + interval(schedule)
    schedule.save()
    audit(actor, "schedule.create", container, detail=f"schedule {schedule.pk}: {describe(schedule)}")
    return schedule


def delete_schedule(actor: Actor, schedule: SnapshotSchedule) -> None:
    """Its snapshots stay (as if taken by hand: no retention deletes them any more)."""
    container, text = schedule.container, f"schedule {schedule.pk}: {describe(schedule)}"
    schedule.delete()
    audit(actor, "schedule.delete", container, detail=text)


def as_dict(s: SnapshotSchedule) -> dict:
    return {
        "id": s.pk,
        "container": s.container.name,
        "every": s.every,
        "unit": s.unit,
        "stateful": s.stateful,
        "keep_last": s.keep_last,
        "keep_days": s.keep_days,
        "description": describe(s),
        "created_by": s.created_by.get_username() if s.created_by else None,
        "created_at": s.created_at,
        "next_run_at": s.next_run_at,
        "last_run_at": s.last_run_at,
        "last_note": s.last_note,
        "snapshots": s.snapshots.count(),
    }


# --- run by beat -------------------------------------------------------------------------


def to_delete(schedule: SnapshotSchedule, now: dt.datetime) -> list[Snapshot]:
    """The schedule's snapshots that no rule keeps, oldest first. No rule: all are kept."""
    if not schedule.keep_last and not schedule.keep_days:
        return []
    snaps = list(schedule.snapshots.order_by("-created_at", "-pk"))
    out = []
    for rank, snap in enumerate(snaps):
        kept = (schedule.keep_last and rank < schedule.keep_last) or (
            schedule.keep_days and now - snap.created_at < dt.timedelta(days=schedule.keep_days)
        )
        if not kept:
            out.append(snap)
    return out[::-1]


def _actor(schedule: SnapshotSchedule) -> Actor:
    return Actor(schedule.created_by, None)


def _name(schedule: SnapshotSchedule, now: dt.datetime) -> str:
    base = f"auto{schedule.pk}-{now:%Y%m%d-%H%M%S}"
    taken = set(schedule.container.snapshots.values_list("name", flat=True))
    name, i = base, 1
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def run_schedule(schedule: SnapshotSchedule, now: dt.datetime) -> str:
    """One tick of one schedule: its snapshot if it is due, else one retention delete. Returns
    what it did, in words."""
    container = schedule.container
    busy = active_operation(container)
    if schedule.next_run_at <= now:
        if busy:
            schedule.last_note = f"waiting: {container.name} is busy with operation {busy.pk} ({busy.kind})"
            schedule.save(update_fields=["last_note"])
            return schedule.last_note
        step = interval(schedule)
        nxt = schedule.next_run_at + step
        while nxt <= now:  # runs missed while the workers were down are not made up
            nxt += step
        schedule.next_run_at, schedule.last_run_at = nxt, now
        if schedule.stateful and container.state != Container.State.RUNNING:
            schedule.last_note = f"skipped at {now:%Y-%m-%d %H:%M} UTC: {container.name} was {container.state}"
            schedule.save(update_fields=["next_run_at", "last_run_at", "last_note"])
            return schedule.last_note
        try:
            op = snapshot_container(
                _actor(schedule), container, _name(schedule, now), stateful=schedule.stateful, schedule=schedule.pk
            )
        except ApiError as e:
            schedule.last_note = f"skipped at {now:%Y-%m-%d %H:%M} UTC: {e.detail}"[:300]
            schedule.save(update_fields=["next_run_at", "last_run_at", "last_note"])
            return schedule.last_note
        schedule.last_note = ""
        schedule.save(update_fields=["next_run_at", "last_run_at", "last_note"])
        return f"snapshot {op.params['snapshot']} (operation {op.pk})"
    if busy:
        return "busy"
    for snap in to_delete(schedule, now):  # not busy: no operation is using any of them
        try:
            op = delete_snapshot(_actor(schedule), container, snap)
        except ApiError as e:
            return f"retention waits: {e.detail}"
        return f"retention: deleting {snap.name} (operation {op.pk})"
    return "nothing to do"


def run_schedules(now: dt.datetime | None = None) -> dict[int, str]:
    """Every schedule's tick (beat, every 30 s). A failure of one never stops the others."""
    now = now or timezone.now()
    out = {}
    for schedule in SnapshotSchedule.objects.select_related("container", "created_by").order_by("pk"):
        try:
            with transaction.atomic():
                out[schedule.pk] = run_schedule(schedule, now)
        except Exception:
            log.exception("snapshot schedule %s", schedule.pk)
            out[schedule.pk] = "error (see the worker's log)"
    return out
