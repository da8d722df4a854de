"""Snapshot schedules (containers/schedules.py): operators add them per container, beat takes
the snapshots that are due as ordinary operations, and retention deletes the schedule's own
older snapshots (keep the last K and/or D days), never a snapshot taken by hand and never
while an operation works on the container. The snapshots themselves are the agent's (lab)."""

import datetime as dt

import pytest
from django.conf import settings
from django.test import Client
from django.utils import timezone

from containers import handlers, schedules
from containers.models import Container, Snapshot, SnapshotSchedule
from core.models import AuditEntry
from operations.models import Operation
from operations.runner import OperationContext

URL = "/api/v1/containers/c1/schedules/"


@pytest.fixture
def c1(trusted_host):
    return Container.objects.create(name="c1", host=trusted_host, state="RUNNING", ipv4="10.9.9.100")


def api(tokens, who="bob"):
    return {"HTTP_AUTHORIZATION": f"Token {tokens[who]}"}


def add(tokens, body, who="bob"):
    return Client().post(URL, body, content_type="application/json", **api(tokens, who))


def test_an_operator_adds_lists_and_removes_a_schedule(tokens, c1):
    r = add(tokens, {"every": 2, "unit": "hours", "stateful": True, "keep_last": 5, "keep_days": 7})
    assert r.status_code == 201, r.content
    body = r.json()
    assert body["description"] == "every 2 hours, stateful, keeping the last 5 or 7 days"
    s = SnapshotSchedule.objects.get(pk=body["id"])
    assert dt.timedelta(hours=1, minutes=59) < s.next_run_at - timezone.now() <= dt.timedelta(hours=2)
    listed = Client().get(URL, **api(tokens, "carol")).json()
    assert [x["id"] for x in listed] == [s.pk] and listed[0]["keep_days"] == 7
    assert AuditEntry.objects.get(action="schedule.create").detail.startswith(f"schedule {s.pk}: every 2 hours")
    r = Client().delete(f"{URL}{s.pk}/", **api(tokens))
    assert r.status_code == 204
    assert not SnapshotSchedule.objects.exists()
    assert AuditEntry.objects.filter(action="schedule.delete").count() == 1


@pytest.mark.parametrize(
    "body,field",
    [
        ({"every": 1, "unit": "weeks"}, "unit"),
        ({"every": 1, "unit": {}}, "unit"),  # a 500 before (unhashable): found by the fresh-clone fuzz
        ({"every": 1, "unit": ["hours"]}, "unit"),
        ({"every": 0, "unit": "hours"}, "every"),
        ({"every": "often", "unit": "hours"}, "every"),
        ({"unit": "hours"}, "every"),
        ({"every": 400, "unit": "days"}, "every"),
        ({"every": 1, "unit": "hours", "keep_last": 0}, "keep_last"),
        ({"every": 1, "unit": "hours", "keep_days": -3}, "keep_days"),
        ({"every": 1, "unit": "hours", "stateful": "maybe"}, "stateful"),
        ({"every": 1, "unit": "hours", "stateful": None}, "stateful"),  # JSON's null is no boolean (found by the fuzz)
        ({"every": 1, "unit": "hours", "stateful": "false"}, "stateful"),
        ({"every": "5", "unit": "hours"}, "every"),  # a string is not a JSON number
        ({"every": True, "unit": "hours"}, "every"),
    ],
)
def test_a_bad_schedule_is_refused_and_nothing_is_saved(tokens, c1, body, field):
    r = add(tokens, body)
    assert r.status_code == 400, r.content
    assert r.json()["field"] == field
    assert not SnapshotSchedule.objects.exists()


def make(c1, **kw) -> SnapshotSchedule:
    fields = {"every": 1, "unit": "hours", "stateful": True, "next_run_at": timezone.now() - dt.timedelta(seconds=1)}
    return SnapshotSchedule.objects.create(container=c1, **{**fields, **kw})


def test_a_due_schedule_starts_a_snapshot_operation_and_moves_on(c1):
    s = make(c1)
    due = s.next_run_at
    now = timezone.now()
    out = schedules.run_schedules(now)
    op = Operation.objects.get(kind="snapshot")
    assert out[s.pk] == f"snapshot {op.params['snapshot']} (operation {op.pk})"
    assert op.params["schedule"] == s.pk and op.params["stateful"] is True
    assert op.params["snapshot"].startswith(f"auto{s.pk}-")
    s.refresh_from_db()
    assert s.next_run_at == due + dt.timedelta(hours=1) and s.last_run_at == now
    assert schedules.run_schedules(now)[s.pk] == "busy"  # not due, and the snapshot still runs


def test_missed_runs_are_not_made_up(c1):
    s = make(c1, every=10, unit="minutes", next_run_at=timezone.now() - dt.timedelta(hours=1, minutes=5))
    now = timezone.now()
    schedules.run_schedules(now)
    assert Operation.objects.filter(kind="snapshot").count() == 1
    s.refresh_from_db()
    assert now < s.next_run_at <= now + dt.timedelta(minutes=10)


def test_a_busy_container_is_left_for_the_next_tick(c1):
    s = make(c1)
    Operation.objects.create(kind="restore", status="running", container=c1, container_name="c1", host=c1.host)
    out = schedules.run_schedules()
    assert "busy with operation" in out[s.pk]
    assert not Operation.objects.filter(kind="snapshot").exists()
    s.refresh_from_db()
    assert s.next_run_at <= timezone.now()  # still due


def test_a_stateful_schedule_skips_a_stopped_container_and_says_why(c1):
    c1.state = "STOPPED"
    c1.save()
    s = make(c1)
    schedules.run_schedules()
    s.refresh_from_db()
    assert "c1 was STOPPED" in s.last_note and s.next_run_at > timezone.now()
    assert not Operation.objects.exists()


def test_the_snapshot_is_recorded_as_the_schedules(c1, monkeypatch):
    s = make(c1)
    schedules.run_schedules()
    op = Operation.objects.get(kind="snapshot")
    monkeypatch.setattr(handlers, "agent_or_wait", lambda *a, **kw: {"size_bytes": 1, "stats": {}})
    handlers.snapshot(OperationContext(op))
    assert Snapshot.objects.get(name=op.params["snapshot"]).schedule == s


def snaps(c1, s, ages_h, prefix="a"):
    now = timezone.now()
    for i, age in enumerate(ages_h):
        Snapshot.objects.create(container=c1, name=f"{prefix}{i}", schedule=s, created_at=now - dt.timedelta(hours=age))


def deletions(c1) -> list[str]:
    """Retention ticks until it starts nothing more; each delete is run (the row removed) in between."""
    deleted = []
    for _ in range(20):
        schedules.run_schedules()
        op = Operation.objects.filter(kind="delete-snapshot", status="pending").first()
        if op is None:
            return deleted
        deleted.append(op.params["snapshot"])
        Snapshot.objects.filter(container=c1, name=op.params["snapshot"]).delete()
        op.status = "success"
        op.save()
    raise AssertionError("retention never ends")


def test_retention_keeps_the_last_k_of_its_own_snapshots_only(c1):
    s = make(c1, keep_last=2, next_run_at=timezone.now() + dt.timedelta(hours=1))
    snaps(c1, s, [1, 2, 3, 4, 5])
    Snapshot.objects.create(container=c1, name="byhand", created_at=timezone.now() - dt.timedelta(days=30))
    assert deletions(c1) == ["a4", "a3", "a2"]  # oldest first, one operation at a time
    assert sorted(c1.snapshots.values_list("name", flat=True)) == ["a0", "a1", "byhand"]


def test_retention_keeps_what_either_rule_keeps(c1):
    s = make(c1, keep_last=1, keep_days=1, next_run_at=timezone.now() + dt.timedelta(hours=1))
    snaps(c1, s, [1, 5, 23, 25, 50])
    assert deletions(c1) == ["a4", "a3"]
    s.keep_last = None
    s.save()
    snaps(c1, s, [30], prefix="b")
    assert deletions(c1) == ["b0"]


def test_retention_never_deletes_a_snapshot_an_operation_uses(c1):
    s = make(c1, keep_last=1, next_run_at=timezone.now() + dt.timedelta(hours=1))
    snaps(c1, s, [1, 2, 3])
    restoring = Operation.objects.create(
        kind="restore", status="running", container=c1, container_name="c1", host=c1.host, params={"snapshot": "a2"}
    )
    assert schedules.run_schedules()[s.pk] == "busy"
    assert not Operation.objects.filter(kind="delete-snapshot").exists()
    restoring.status = "waiting"  # still active
    restoring.save()
    assert schedules.run_schedules()[s.pk] == "busy"
    restoring.status = "success"
    restoring.save()
    assert deletions(c1) == ["a2", "a1"]


def test_without_a_rule_every_snapshot_is_kept(c1):
    s = make(c1, next_run_at=timezone.now() + dt.timedelta(hours=1))
    snaps(c1, s, [1, 100, 10000])
    assert deletions(c1) == []


def test_beat_runs_the_schedules(c1):
    entry = next(e for e in settings.CELERY_BEAT_SCHEDULE.values() if e["task"].endswith("run_snapshot_schedules"))
    assert entry["schedule"] <= 60


def test_the_container_page_shows_and_adds_schedules(users, c1):
    web = Client()
    web.force_login(users["bob"])
    r = web.post("/containers/c1/schedules/", {"every": "30", "unit": "minutes", "stateful": "1", "keep_last": "4"})
    assert r.status_code == 302
    s = SnapshotSchedule.objects.get()
    assert (s.every, s.unit, s.stateful, s.keep_last, s.keep_days) == (30, "minutes", True, 4, None)
    page = web.get("/containers/c1/").content.decode()
    assert "Every 30 minutes, stateful; keep the last 4" in page
    web.post("/containers/c1/schedules/", {"every": "0", "unit": "minutes"})
    assert SnapshotSchedule.objects.count() == 1
    web.post(f"/containers/c1/schedules/{s.pk}/delete")
    assert not SnapshotSchedule.objects.exists()
