"""An evacuation holds no worker thread while its migrations run, ends when the last one
ends, and a cancel reaches its children."""

import pytest

from operations import runner, tasks
from operations.models import Operation


@pytest.fixture
def queued(monkeypatch):
    out = []
    monkeypatch.setattr(tasks.recover_operation_task, "delay", out.append)
    return out


def _evacuation(host, *child_status):
    evac = Operation.objects.create(kind="evacuate", host=host, status="running", worker="w@a")
    kids = [
        Operation.objects.create(kind="migrate", status=s, parent=evac, container_name=f"c{i}")
        for i, s in enumerate(child_status)
    ]
    evac.result = {"children": [k.pk for k in kids], "refused": {}, "containers": len(kids)}
    evac.save()
    return evac, kids


def _end(child, status, evac, queued, capture):
    """A child ends: its evacuation is asked again at once (no scheduler tick), by a queued recovery."""
    with capture(execute=True):
        assert runner.finish(child, status)
    assert queued == [evac.pk]
    runner.recover_operation(queued.pop(), "w@b")
    evac.refresh_from_db()


def test_an_evacuation_waits_without_a_thread_and_ends_with_its_last_child(
    db, trusted_host, queued, django_capture_on_commit_callbacks
):
    evac, (a, b) = _evacuation(trusted_host, "running", "running")
    runner.recover_operation(evac.pk, "w@a")  # what the handler does once its children are queued
    evac.refresh_from_db()
    assert (evac.status, evac.worker) == ("waiting", "")
    _end(a, "success", evac, queued, django_capture_on_commit_callbacks)
    assert evac.status == "waiting" and "1 of 2" in evac.result["waiting"]["sentence"]
    _end(b, "success", evac, queued, django_capture_on_commit_callbacks)
    assert evac.status == "success" and evac.result["moved"] == 2


def test_cancelling_an_evacuation_cancels_its_children(
    db, trusted_host, queued, tokens, django_capture_on_commit_callbacks
):
    from django.test import Client

    evac, (waiting_child, running_child) = _evacuation(trusted_host, "pending", "running")
    runner.recover_operation(evac.pk, "w@a")
    with django_capture_on_commit_callbacks(execute=True):
        r = Client().post(f"/api/v1/operations/{evac.pk}/cancel", HTTP_AUTHORIZATION=f"Token {tokens['bob']}")
    assert r.status_code == 202 and queued == [evac.pk]  # held by no thread: it is asked again at once
    runner.recover_operation(queued.pop(), "w@b")
    evac.refresh_from_db()
    waiting_child.refresh_from_db()
    running_child.refresh_from_db()
    assert waiting_child.status == "cancelled"  # never started
    assert running_child.status == "running" and running_child.cancel_requested  # asked to stop where safe
    assert evac.status == "waiting"
    _end(running_child, "cancelled", evac, queued, django_capture_on_commit_callbacks)
    assert evac.status == "cancelled"


def test_a_child_that_ends_while_its_evacuation_is_being_parked_is_not_missed(
    db, trusted_host, queued, django_capture_on_commit_callbacks, monkeypatch
):
    """The child ends between the evacuation's check and its park (its finish found the
    evacuation still running, so it could not ask it again): the park notices."""
    evac, (a,) = _evacuation(trusted_host, "running")
    real_park = runner.park

    def park_late(op, wait, *args):
        Operation.objects.filter(pk=a.pk).update(status="success")  # ends in the gap
        return real_park(op, wait, *args)

    monkeypatch.setattr(runner, "park", park_late)
    with django_capture_on_commit_callbacks(execute=True):
        runner.recover_operation(evac.pk, "w@a")
    assert queued == [evac.pk]
    monkeypatch.setattr(runner, "park", real_park)
    runner.recover_operation(queued.pop(), "w@b")
    evac.refresh_from_db()
    assert evac.status == "success"
