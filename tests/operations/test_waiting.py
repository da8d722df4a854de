"""Unknown is its own outcome: an operation that cannot tell what is true waits, held by no
thread, is asked again with backoff, and may offer an admin actions (decisions)."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from containers.models import Container
from core.models import AuditEntry
from operations import runner, tasks
from operations.models import Operation
from operations.runner import KEEP_WAITING, OperationFailed, WaitFor, handler

ACTIONS = [
    {"id": "go", "label": "Go", "consequence": "It goes."},
    {"id": KEEP_WAITING, "label": "Keep waiting", "consequence": "Nothing changes."},
]


@pytest.fixture
def kinds(monkeypatch):
    saved = dict(runner.HANDLERS)
    queued = {"recover": [], "run": []}
    monkeypatch.setattr(tasks.recover_operation_task, "delay", queued["recover"].append)
    monkeypatch.setattr(tasks.run_operation_task, "delay", queued["run"].append)
    yield queued
    runner.HANDLERS.clear()
    runner.HANDLERS.update(saved)


def test_the_backoff_doubles_from_15_s_up_to_5_min():
    assert [runner.wait_backoff(n) for n in range(1, 9)] == [15, 30, 60, 120, 240, 300, 300, 300]


def _waiting(monkeypatch, actions=None, answers=None):
    """A 'sync' job whose host does not answer; its recovery answers as `answers` says."""
    answers = list(answers or [])

    @handler("sync")
    def job(ctx):
        raise WaitFor("h1 does not answer; ctweb asks again.", actions)

    def recover(ctx):
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    monkeypatch.setitem(runner.RECOVERERS, "sync", recover)
    op = Operation.objects.create(kind="sync")
    assert runner.run_operation(op.pk, "w@a") == "waiting"
    op.refresh_from_db()
    return op


def test_an_unknown_outcome_waits_held_by_no_thread_and_is_asked_again_with_backoff(db, kinds, monkeypatch):
    op = _waiting(monkeypatch, answers=[WaitFor("still nothing"), "h1 answered: it runs there."])
    assert (op.status, op.worker, op.heartbeat_at) == ("waiting", "", None)
    assert op.is_active and op.result["waiting"]["attempts"] == 1
    # Never taken for lost: it is not running and no heartbeat is expected.
    assert runner.mark_lost_operations("w@b", alive=lambda node: False, starting=True) == 0
    now = timezone.now()
    assert runner.retry_waiting_operations("w@b", now=now) == 0  # its 15 s have not passed
    assert runner.retry_waiting_operations("w@b", now=now + timedelta(seconds=16)) == 1
    assert kinds["recover"] == [op.pk]
    assert runner.retry_waiting_operations("w@c", now=now + timedelta(seconds=16)) == 0  # taken once
    runner.recover_operation(op.pk, "w@b")
    op.refresh_from_db()
    assert op.status == "waiting" and op.result["waiting"]["attempts"] == 2
    retry_at = timezone.datetime.fromisoformat(op.result["waiting"]["retry_at"])
    assert timedelta(seconds=25) < retry_at - timezone.now() <= timedelta(seconds=30)
    assert runner.retry_waiting_operations("w@b", now=retry_at + timedelta(seconds=1)) == 1
    runner.recover_operation(op.pk, "w@b")
    op.refresh_from_db()
    assert op.status == "failure" and op.error.startswith("After waiting since")
    assert "h1 answered" in op.error


def test_a_waiting_operation_still_blocks_other_operations_on_its_container(db, kinds, monkeypatch, trusted_host):
    from containers.services import active_operation

    c = Container.objects.create(name="c1", host=trusted_host, state="STOPPED")
    op = _waiting(monkeypatch)
    Operation.objects.filter(pk=op.pk).update(container=c)
    assert active_operation(c).pk == op.pk


def test_a_waiting_migration_is_never_tidied(db, trusted_host, monkeypatch):
    from containers import handlers

    calls = []
    monkeypatch.setattr(handlers, "agent", lambda *a, **k: calls.append(a))
    Container.objects.create(name="c1", host=trusted_host, state="STOPPED")
    op = Operation.objects.create(kind="migrate", status="waiting", container_name="c1", target_host=trusted_host)
    assert handlers.tidy_migrations(trusted_host, [{"migration": op.pk}]) == []
    assert calls == []


def test_an_admin_decision_is_checked_audited_and_runs_the_kinds_decision_handler(
    db, kinds, monkeypatch, tokens, django_capture_on_commit_callbacks
):
    op = _waiting(monkeypatch, actions=ACTIONS, answers=[WaitFor("h1 still does not answer.", ACTIONS)])
    assert op.result["decision"]["actions"] == ACTIONS
    ran = []

    def decide(ctx, action):
        ran.append(action)
        raise OperationFailed("Rolled back by an admin's decision.")

    monkeypatch.setitem(runner.DECISION_HANDLERS, "sync", decide)

    def post(who, body):
        return Client().post(
            f"/api/v1/operations/{op.pk}/decide",
            body,
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Token {tokens[who]}",
        )

    assert post("bob", {"action": "go"}).status_code == 403  # operators do not decide
    r = post("alice", {"action": "nope"})
    assert r.status_code == 409 and "go, keep-waiting" in str(r.json())
    with django_capture_on_commit_callbacks(execute=True):
        r = post("alice", {"action": KEEP_WAITING})
    assert r.status_code == 202 and r.json()["status"] == "running"  # "keep waiting" asks again at once
    assert kinds["recover"] == [op.pk]
    runner.recover_operation(op.pk, "w@b")
    op.refresh_from_db()
    assert op.status == "waiting" and op.result["decision"]["sentence"] == "h1 still does not answer."
    with django_capture_on_commit_callbacks(execute=True):
        r = post("alice", {"action": "go"})
    assert r.status_code == 202 and r.json()["status"] == "pending"
    assert kinds["run"] == [op.pk]
    assert runner.run_operation(op.pk, "w@a") == "failure"
    op.refresh_from_db()
    assert ran == ["go"] and op.error == "Rolled back by an admin's decision."
    assert [d["action"] for d in op.result["decisions"]] == [KEEP_WAITING, "go"]
    assert op.result["decided"]["by"] == "alice" and op.result["decided"]["ran"]
    audited = list(
        AuditEntry.objects.filter(action="operation.decide").order_by("at", "pk").values_list("detail", flat=True)
    )
    assert audited == ["sync keep-waiting", "sync go"]
    assert post("alice", {"action": "go"}).status_code == 409  # it waits for nothing any more


def test_a_database_error_while_moving_a_migrations_record_leads_to_recovery_not_a_crash(
    db, kinds, monkeypatch, trusted_host
):
    """The hosts moved the container but the database refused the write: the operation waits
    and its recovery asks the hosts again (it used to end as an internal error, the record
    naming the source while the target ran it)."""
    from django.db import OperationalError, connection

    from containers.migration.common import move_record

    target = type(trusted_host).objects.create(name="h2", address="127.0.0.2", port=1, status="online")
    c = Container.objects.create(name="c1", host=trusted_host, state="RUNNING")

    def refuse(execute, sql, params, many, context):
        if sql.startswith('UPDATE "containers_container"'):
            raise OperationalError("database is locked")  # what SQLite says when it cannot write
        return execute(sql, params, many, context)

    @handler("migrate")
    def job(ctx):
        with connection.execute_wrapper(refuse):
            move_record(ctx, c, target, True)

    op = Operation.objects.create(kind="migrate", container=c, host=trusted_host, target_host=target)
    assert runner.run_operation(op.pk, "w@a") == "waiting"
    op.refresh_from_db()
    assert "could not record it" in op.result["waiting"]["sentence"]
    assert Container.objects.get(pk=c.pk).host == trusted_host  # unchanged until the hosts are asked again


def test_resuming_a_migration_on_a_source_that_does_not_answer_waits_again(
    db, kinds, trusted_host, users, django_capture_on_commit_callbacks
):
    """The migrate decision 'resume-source' needs the source: while it does not answer (port 1
    refuses), the migration waits again with the same choice; nothing is guessed."""
    from containers.migration import RESUME_SOURCE, unreachable_target_actions

    target = type(trusted_host).objects.create(name="h2", address="127.0.0.2", port=1, status="online")
    c = Container.objects.create(name="c1", host=trusted_host, state="STOPPED")
    actions = unreachable_target_actions("h1", "h2", True)
    op = Operation.objects.create(
        kind="migrate",
        status="waiting",
        container=c,
        host=trusted_host,
        target_host=target,
        params={"strategy": "stop-and-copy"},
        result={
            "waiting": {"sentence": "h2 does not answer", "attempts": 1},
            "decision": {"sentence": "x", "actions": actions},
        },
    )
    with django_capture_on_commit_callbacks(execute=True):
        runner.decide(op.pk, RESUME_SOURCE, users["alice"])
    assert kinds["run"] == [op.pk]
    assert runner.run_operation(op.pk, "w@a") == "waiting"
    op.refresh_from_db()
    assert [a["id"] for a in op.result["decision"]["actions"]] == [RESUME_SOURCE, KEEP_WAITING]
    assert "h1 could not resume c1" in op.result["waiting"]["sentence"]
    assert Container.objects.get(pk=c.pk).host == trusted_host
