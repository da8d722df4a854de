"""The canary's automatic checks never get in a person's way (found by CI: a check started by
beat froze a freshly made container for its trial dump, the state refresh recorded FROZEN, and
the operator's migration was refused as "snapc is FROZEN"; another answered 409 "already has an
operation running (check …)"). Three rules, each seen failing before its change:
- a host's listing never overwrites the state of a container whose operation runs or waits;
- a person's request makes an automatic check step aside (a queued one is cancelled, a running
  one is waited for), while a person's own check still refuses a second operation;
- the canary leaves alone a container that had an operation in the last minutes."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from containers import handlers, services
from containers.handlers import _apply_listing
from containers.models import Container
from operations.models import Operation


def _listing(state: str) -> list[dict]:
    return [{"name": "c1", "state": state, "ipv4": [], "ipv6": []}]


@pytest.fixture
def c1(db, trusted_host):
    trusted_host.status = "online"
    trusted_host.save()
    return Container.objects.create(name="c1", host=trusted_host, state="RUNNING")


def _check(c: Container, status: str = "pending", auto: bool = True) -> Operation:
    params = {"trial": True, "auto": True} if auto else {"trial": True}
    return Operation.objects.create(
        kind="check", status=status, container=c, container_name=c.name, host=c.host, params=params
    )


def _post(tokens, path, body):
    return Client().post(path, body, content_type="application/json", HTTP_AUTHORIZATION=f"Token {tokens['bob']}")


def test_a_listing_taken_during_an_operation_leaves_the_state_to_the_operation(c1):
    op = _check(c1, "running")
    out = _apply_listing(c1.host, _listing("FROZEN"))  # the trial dump's freeze, seen by a refresh
    c1.refresh_from_db()
    assert c1.state == "RUNNING" and out["changed"] == []
    Operation.objects.filter(pk=op.pk).update(status="success", finished_at=timezone.now())
    _apply_listing(c1.host, _listing("STOPPED"))  # with nothing running, the host's word counts
    c1.refresh_from_db()
    assert c1.state == "STOPPED"


def test_a_persons_request_cancels_a_queued_automatic_check_and_goes_ahead(c1, tokens):
    check = _check(c1)
    r = _post(tokens, "/api/v1/containers/c1/state", {"action": "stop"})
    assert r.status_code == 202, r.content
    check.refresh_from_db()
    assert check.status == "cancelled" and "Stepped aside" in check.error
    assert Operation.objects.get(pk=r.json()["id"]).kind == "stop"


def test_a_running_automatic_check_is_waited_for_then_the_request_goes_ahead(c1, tokens, monkeypatch):
    check = _check(c1, "running")
    waited = []

    def sleep(s):  # the check's worker ends it while the request waits
        waited.append(s)
        Operation.objects.filter(pk=check.pk).update(status="success", finished_at=timezone.now())

    monkeypatch.setattr(services.time, "sleep", sleep)
    r = _post(tokens, "/api/v1/containers/c1/state", {"action": "stop"})
    assert r.status_code == 202, r.content
    assert waited and Operation.objects.get(pk=check.pk).cancel_requested


def test_a_check_that_does_not_end_in_time_still_refuses_and_a_persons_check_is_never_cancelled(
    c1, tokens, monkeypatch
):
    monkeypatch.setattr(services, "AUTO_YIELD_SECONDS", 0.3)
    stuck = _check(c1, "running")
    r = _post(tokens, "/api/v1/containers/c1/state", {"action": "stop"})
    assert r.status_code == 409 and "already has an operation running (check" in r.json()["error"]
    Operation.objects.filter(pk=stuck.pk).update(status="success", finished_at=timezone.now())
    mine = _check(c1, auto=False)
    r = _post(tokens, "/api/v1/containers/c1/state", {"action": "stop"})
    assert r.status_code == 409
    mine.refresh_from_db()
    assert mine.status == "pending" and not mine.cancel_requested


def test_the_canary_leaves_alone_a_container_someone_worked_on_minutes_ago(c1, monkeypatch):
    monkeypatch.setattr(handlers, "enqueue", lambda op: None)
    now = timezone.now()
    Operation.objects.create(kind="start", status="success", container=c1, container_name="c1", host=c1.host,
                             created_at=now - timedelta(minutes=4), finished_at=now - timedelta(minutes=3))  # fmt: skip
    assert handlers.canary_checks(24, now=now, quiet_minutes=10) == []
    assert handlers.canary_checks(24, now=now + timedelta(minutes=11), quiet_minutes=10) == ["c1"]
