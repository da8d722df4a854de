"""The job runner: one claim, exactly one terminal state, honest messages."""

import pytest
from django.conf import settings

from operations import runner
from operations.models import Operation
from operations.runner import OperationFailed, handler


@pytest.fixture
def kinds():
    saved = dict(runner.HANDLERS)
    yield runner.HANDLERS
    runner.HANDLERS.clear()
    runner.HANDLERS.update(saved)


def _op(kind="sync"):
    return Operation.objects.create(kind=kind)


def test_it_runs_a_job_to_success_with_its_result(db, kinds):
    @handler("sync")
    def job(ctx):
        ctx.event("work", "half way", 50)
        return {"answer": 42}

    op = _op()
    assert runner.run_operation(op.pk, "w1") == "success"
    op.refresh_from_db()
    assert (op.status, op.progress, op.result, op.worker) == ("success", 100, {"answer": 42}, "w1")
    assert op.started_at and op.finished_at
    assert [e["phase"] for e in op.events] == ["work", "success"]


def test_it_does_nothing_the_second_time(db, kinds):
    calls = []

    @handler("sync")
    def job(ctx):
        calls.append(1)

    op = _op()
    runner.run_operation(op.pk)
    assert runner.run_operation(op.pk) is None  # a redelivered task finds the row ended
    assert calls == [1]


def test_an_expected_failure_keeps_its_sentence_and_details(db, kinds):
    @handler("sync")
    def job(ctx):
        raise OperationFailed("CRIU refused the dump.", "Error (criu/files.c:123): cannot dump X")

    op = _op()
    assert runner.run_operation(op.pk) == "failure"
    op.refresh_from_db()
    assert op.error.startswith("CRIU refused the dump.")
    assert "criu/files.c:123" in op.error


def test_a_crash_gets_a_short_sentence_and_no_traceback(db, kinds, caplog):
    @handler("sync")
    def job(ctx):
        raise KeyError("secret internals")

    op = _op()
    assert runner.run_operation(op.pk) == "failure"
    op.refresh_from_db()
    assert "internal error" in op.error
    assert "Traceback" not in op.error and "secret internals" not in op.error
    assert "secret internals" in caplog.text  # the worker log has it


def test_an_unknown_kind_fails_cleanly(db):
    op = _op("evacuate")
    assert runner.run_operation(op.pk) == "failure"


def test_a_cancel_before_start_ends_it_cancelled(db, kinds):
    @handler("sync")
    def job(ctx):
        raise AssertionError("must not run")

    op = _op()
    Operation.objects.filter(pk=op.pk).update(cancel_requested=True)
    assert runner.run_operation(op.pk) == "cancelled"


def test_finish_ends_a_row_only_once(db):
    op = _op()
    Operation.objects.filter(pk=op.pk).update(status="running")
    op.refresh_from_db()
    assert runner.finish(op, "success")
    again = Operation.objects.get(pk=op.pk)
    assert not runner.finish(again, "failure", error="late")
    again.refresh_from_db()
    assert again.status == "success" and again.error == ""


def test_lost_operations_are_failed_only_for_dead_workers(db):
    mine = Operation.objects.create(kind="probe", status="running", worker="w@a")
    other_alive = Operation.objects.create(kind="probe", status="running", worker="w@b")
    other_dead = Operation.objects.create(kind="probe", status="running", worker="w@c")
    pending = Operation.objects.create(kind="probe")
    assert runner.mark_lost_operations("w@a", alive=lambda node: node == "w@b") == 2
    statuses = dict(Operation.objects.values_list("pk", "status"))
    assert statuses == {mine.pk: "failure", other_alive.pk: "running", other_dead.pk: "failure", pending.pk: "pending"}


def test_progress_is_saved_throttled_but_phase_changes_at_once(db, kinds):
    seen = []

    @handler("sync")
    def job(ctx):
        ctx.event("a", "one", 10)
        seen.append(Operation.objects.get(pk=ctx.op.pk).phase)  # new phase: saved
        ctx.event("a", "two", 20)
        seen.append(Operation.objects.get(pk=ctx.op.pk).progress)  # same phase, within 0.5 s: not yet

    op = _op()
    runner.run_operation(op.pk)
    assert seen == ["a", 10]
    op.refresh_from_db()
    assert [e["message"] for e in op.events][:2] == ["one", "two"]


def test_a_job_the_queue_refused_fails_and_releases_its_reservation(db, trusted_host):
    from containers.models import Container

    c = Container.objects.create(name="c1", host=trusted_host, state="CREATING", ipv4="10.9.9.100")
    op = Operation.objects.create(kind="create", container=c, container_name="c1", host=trusted_host)
    runner.fail_unqueued(op.pk, "The job queue is unreachable.")
    op.refresh_from_db()
    assert (op.status, op.error) == ("failure", "The job queue is unreachable.")
    assert op.finished_at is not None
    assert not Container.objects.filter(name="c1").exists()


def test_a_beating_row_is_never_taken_for_lost_even_if_its_worker_is_slow_to_answer(db):
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    beating = Operation.objects.create(kind="probe", status="running", worker="w@busy", heartbeat_at=now)
    silent = Operation.objects.create(
        kind="probe",
        status="running",
        worker="w@gone",
        heartbeat_at=now - timedelta(seconds=settings.OPERATION_LOST_AFTER_S + 5),
    )
    assert runner.mark_lost_operations("w@new", alive=lambda node: False) == 1
    statuses = dict(Operation.objects.values_list("pk", "status"))
    assert statuses == {beating.pk: "running", silent.pk: "failure"}


def test_a_lost_migration_stays_running_under_the_new_worker_until_it_is_recovered(db, monkeypatch):
    from operations import tasks

    queued = []
    monkeypatch.setattr(tasks.recover_operation_task, "delay", queued.append)
    lost = Operation.objects.create(kind="migrate", status="running", worker="w@old")
    assert runner.mark_lost_operations("w@new", alive=lambda node: False) == 1
    lost.refresh_from_db()
    assert (lost.status, lost.worker, lost.phase) == ("running", "w@new", "recovery")
    assert queued == [lost.pk]
    # Its container is gone meanwhile: the recovery ends it, honestly.
    runner.recover_operation(lost.pk)
    lost.refresh_from_db()
    assert lost.status == "failure" and lost.error.startswith("Worker lost")
    assert "nothing to recover" in lost.error


def test_the_job_touches_its_row_while_it_runs(transactional_db, kinds, monkeypatch):
    import time

    monkeypatch.setattr(runner, "HEARTBEAT_S", 0.05)
    seen = []

    @handler("sync")
    def slow(ctx):
        first = Operation.objects.get(pk=ctx.op.pk).heartbeat_at
        time.sleep(0.5)
        seen.extend([first, Operation.objects.get(pk=ctx.op.pk).heartbeat_at])
        return {}

    op = _op()
    assert runner.run_operation(op.pk) == "success"
    assert seen[0] is not None and seen[1] > seen[0]


def test_the_heartbeat_beats_on_through_database_errors(transactional_db, kinds, monkeypatch):
    """The heartbeat's first writes hit a dead database connection (the driver's own
    connection is closed under it, so the driver raises its real error); it keeps beating."""
    import threading
    import time

    from django.db.backends.signals import connection_created

    monkeypatch.setattr(runner, "HEARTBEAT_S", 0.05)
    broken = {"left": 3, "last": None}

    def breaker(execute, sql, params, many, context):
        if sql.lstrip().upper().startswith("UPDATE") and broken["left"] > 0:
            broken["left"] -= 1
            context["connection"].connection.close()  # the server went away under this connection
            broken["last"] = time.monotonic()
        return execute(sql, params, many, context)

    def install(sender, connection, **kwargs):
        if threading.current_thread().name.startswith("heartbeat-") and breaker not in connection.execute_wrappers:
            connection.execute_wrappers.append(breaker)

    connection_created.connect(install)
    seen = {}

    @handler("sync")
    def slow(ctx):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (broken["left"] or time.monotonic() - broken["last"] < 0.5):
            time.sleep(0.05)
        seen["hb"] = Operation.objects.get(pk=ctx.op.pk).heartbeat_at
        return {}

    try:
        op = _op()
        assert runner.run_operation(op.pk, "w@me") == "success"
    finally:
        connection_created.disconnect(install)
    assert broken["left"] == 0  # the faults were injected
    from datetime import timedelta

    from django.utils import timezone

    # Beats after the last fault: written within the last half second of the job.
    assert seen["hb"] is not None and seen["hb"] > timezone.now() - timedelta(seconds=2)
    op.refresh_from_db()
    assert seen["hb"] > op.started_at


def test_the_detector_never_takes_a_row_its_own_live_thread_runs(transactional_db, kinds, monkeypatch):
    """Even when the row looks silent (its heartbeat is old), the node whose thread runs it
    does not take it over."""
    import threading
    from datetime import timedelta

    from django.utils import timezone

    monkeypatch.setattr(runner, "HEARTBEAT_S", 3600)  # no beat during the test
    started, release = threading.Event(), threading.Event()

    @handler("sync")
    def blocked(ctx):
        started.set()
        release.wait(10)
        return {}

    op = _op()

    def run():
        from django.db import connection

        try:
            runner.run_operation(op.pk, "w@me")
        finally:
            connection.close()  # this test's own thread: PostgreSQL's test database is dropped after

    t = threading.Thread(target=run)
    t.start()
    try:
        assert started.wait(10)
        old = timezone.now() - timedelta(seconds=settings.OPERATION_LOST_AFTER_S * 3)
        Operation.objects.filter(pk=op.pk).update(heartbeat_at=old)
        assert runner.mark_lost_operations("w@me", alive=lambda node: False) == 0
        assert runner.mark_lost_operations("w@other", alive=lambda node: node == "w@me") == 0
        assert Operation.objects.get(pk=op.pk).status == "running"
    finally:
        release.set()
        t.join(10)
    assert Operation.objects.get(pk=op.pk).status == "success"


def test_the_scheduled_detector_writes_its_own_name_and_takes_a_row_once(transactional_db, monkeypatch):
    """No sentinel in `worker` (PostgreSQL refuses a NUL; a sentinel matched again every
    minute): the scheduled detector takes a lost row under its real node name, once."""
    from datetime import timedelta

    from django.utils import timezone

    from operations import tasks

    queued = []
    monkeypatch.setattr(tasks.recover_operation_task, "delay", queued.append)
    monkeypatch.setattr(tasks.app.control, "ping", lambda **kw: [])  # no other node answers
    old = timezone.now() - timedelta(seconds=settings.OPERATION_LOST_AFTER_S * 3)
    lost = Operation.objects.create(kind="migrate", status="running", worker="w@old", heartbeat_at=old)
    tasks.find_lost_operations.apply()
    lost.refresh_from_db()
    assert queued == [lost.pk]
    assert (lost.status, lost.phase) == ("running", "recovery")
    assert lost.worker and "\0" not in lost.worker and lost.worker != "w@old"
    tasks.find_lost_operations.apply()  # a minute later: its recovery holds it
    assert queued == [lost.pk]
