"""An offline host is probed again by itself, with backoff (hosts/handlers.py reprobe_offline_hosts)."""

from datetime import timedelta

from django.utils import timezone

from hosts import handlers
from hosts.models import Host
from operations import runner
from operations.models import Operation


def test_the_reprobe_backoff_doubles_from_15_s_up_to_5_min():
    assert [handlers.reprobe_delay(n) for n in range(1, 8)] == [15, 30, 60, 120, 240, 300, 300]


def test_an_offline_host_is_probed_again_with_backoff_and_comes_back_online(
    db, trusted_host, django_capture_on_commit_callbacks, monkeypatch
):
    from operations import tasks

    monkeypatch.setattr(tasks.run_operation_task, "delay", lambda pk: None)
    Host.objects.filter(pk=trusted_host.pk).update(status=Host.Status.OFFLINE)
    untrusted = Host.objects.create(name="h9", address="127.0.0.9", status=Host.Status.OFFLINE)  # no pinned key
    t0 = timezone.now()
    assert handlers.reprobe_offline_hosts(t0) == ["h1"]
    assert handlers.reprobe_offline_hosts(t0) == []  # one probe at a time
    op = Operation.objects.get(host=trusted_host)
    assert op.params["auto"] and op.created_by is None and untrusted.operations.count() == 0
    # Port 1 refuses: the probe fails, the host stays offline; the next try waits 15 s, then 30 s.
    assert runner.run_operation(op.pk, "w@a") == "failure"
    done = Operation.objects.get(pk=op.pk).finished_at
    assert handlers.reprobe_offline_hosts(done + timedelta(seconds=14)) == []
    assert handlers.reprobe_offline_hosts(done + timedelta(seconds=16)) == ["h1"]
    op2 = Operation.objects.filter(host=trusted_host).order_by("-id").first()
    assert runner.run_operation(op2.pk, "w@a") == "failure"
    done = Operation.objects.get(pk=op2.pk).finished_at
    assert handlers.reprobe_offline_hosts(done + timedelta(seconds=29)) == []
    assert handlers.reprobe_offline_hosts(done + timedelta(seconds=31)) == ["h1"]
    # A host that is online is left alone.
    Operation.objects.filter(status="pending").update(status="cancelled")
    Host.objects.filter(pk=trusted_host.pk).update(status=Host.Status.ONLINE)
    assert handlers.reprobe_offline_hosts(done + timedelta(hours=1)) == []


def test_an_operators_probe_is_answered_by_a_queued_probe_but_never_by_one_already_reading_the_host(
    db, trusted_host, tokens, django_capture_on_commit_callbacks, monkeypatch
):
    """An automatic reprobe that began before the operator fixed the host must not stand in for
    the probe they ask for after the fix (a fresh clone's sudo test got the reprobe's success)."""
    from django.test import Client

    from operations import tasks

    monkeypatch.setattr(tasks.run_operation_task, "delay", lambda pk: None)
    Host.objects.filter(pk=trusted_host.pk).update(status=Host.Status.OFFLINE)
    assert handlers.reprobe_offline_hosts(timezone.now()) == ["h1"]
    auto = Operation.objects.get(host=trusted_host)

    def probe() -> int:
        r = Client().post("/api/v1/hosts/h1/probe", HTTP_AUTHORIZATION=f"Token {tokens['alice']}")
        assert r.status_code == 202, r.content
        return r.json()["id"]

    assert probe() == auto.pk  # not begun: it reads the host as it is now
    Operation.objects.filter(pk=auto.pk).update(status=Operation.Status.RUNNING, phase="probe")
    mine = probe()
    assert mine != auto.pk and Operation.objects.get(pk=mine).status == Operation.Status.PENDING
    assert probe() == mine  # and asking twice queues it once
