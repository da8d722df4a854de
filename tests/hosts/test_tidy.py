"""The tidy never destroys: what an ended migration left is removed only when a host is
confirmed to run the container, and never from a host that runs it or keeps its only dump.
The agent is replaced by a table of what each host answers (the decisions are pure logic)."""

import pytest

from containers import jobs
from containers.models import Container
from hosts.models import Host
from operations.models import Operation


@pytest.fixture
def world(db, trusted_host):
    target = Host.objects.create(name="h2", address="127.0.0.2", port=1, status="online", key_data="x")
    c = Container.objects.create(name="c1", host=trusted_host, state="STOPPED")
    op = Operation.objects.create(
        kind="migrate", status="failure", container=c, container_name="c1", host=trusted_host, target_host=target
    )
    return trusted_host, target, c, op


def _agent(monkeypatch, inspect: dict):
    calls = []

    def agent(ctx, host, sub, params, *a, **k):
        calls.append((host.name, sub))
        if sub == "inspect":
            return inspect[host.name]
        return {}

    monkeypatch.setattr(jobs, "agent", agent)
    return calls


def test_the_tidy_never_stops_a_target_that_runs_the_container(world, monkeypatch):
    """The target restored it but its answer was lost: the database still names the source."""
    source, target, c, op = world
    calls = _agent(monkeypatch, {"h1": {"exists": True, "state": "STOPPED"}})
    assert jobs.tidy_migrations(target, [{"migration": op.pk}], [{"name": "c1", "state": "RUNNING"}]) == []
    assert ("h2", "migrate-abort") not in calls
    op.refresh_from_db()
    assert "h2 runs c1" in op.result["disagreement"]


def test_the_tidy_keeps_a_sources_dump_while_no_host_runs_it(world, monkeypatch):
    source, target, c, op = world
    calls = _agent(monkeypatch, {})
    assert jobs.tidy_migrations(source, [{"migration": op.pk}], [{"name": "c1", "state": "STOPPED"}]) == []
    assert calls == []


def test_the_tidy_keeps_a_targets_copy_when_the_source_does_not_run_it(world, monkeypatch):
    source, target, c, op = world
    calls = _agent(monkeypatch, {"h1": {"exists": True, "state": "STOPPED"}})
    assert jobs.tidy_migrations(target, [{"migration": op.pk}], []) == []
    assert calls == [("h1", "inspect")]  # both hosts asked; nothing removed


def test_the_tidy_removes_leftovers_once_the_named_host_is_confirmed_to_run_it(world, monkeypatch):
    source, target, c, op = world
    Container.objects.filter(pk=c.pk).update(state="RUNNING")
    calls = _agent(monkeypatch, {"h1": {"exists": True, "state": "RUNNING"}})
    assert jobs.tidy_migrations(target, [{"migration": op.pk}], []) == [op.pk]
    assert calls == [("h1", "inspect"), ("h2", "migrate-abort")]
    calls.clear()
    assert jobs.tidy_migrations(source, [{"migration": op.pk}], [{"name": "c1", "state": "RUNNING"}]) == [op.pk]
    assert calls == [("h1", "migrate-cleanup")]
