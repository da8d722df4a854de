"""The tidy never destroys: what an ended migration left is removed only when a host is
confirmed to run the container, and never from a host that runs it or keeps its only dump.
The agent is replaced by a table of what each host answers (the decisions are pure logic)."""

import pytest

from containers import handlers
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

    monkeypatch.setattr(handlers, "agent", agent)
    return calls


def test_the_tidy_never_stops_a_target_that_runs_the_container(world, monkeypatch):
    """The target restored it but its answer was lost: the database still names the source."""
    source, target, c, op = world
    calls = _agent(monkeypatch, {"h1": {"exists": True, "state": "STOPPED"}})
    assert handlers.tidy_migrations(target, [{"migration": op.pk}], [{"name": "c1", "state": "RUNNING"}]) == []
    assert ("h2", "migrate-abort") not in calls
    op.refresh_from_db()
    assert "h2 runs c1" in op.result["disagreement"]


def test_the_tidy_keeps_a_sources_dump_while_no_host_runs_it(world, monkeypatch):
    source, target, c, op = world
    calls = _agent(monkeypatch, {})
    assert handlers.tidy_migrations(source, [{"migration": op.pk}], [{"name": "c1", "state": "STOPPED"}]) == []
    assert calls == []


def test_the_tidy_keeps_a_targets_copy_when_the_source_does_not_run_it(world, monkeypatch):
    source, target, c, op = world
    calls = _agent(monkeypatch, {"h1": {"exists": True, "state": "STOPPED"}})
    assert handlers.tidy_migrations(target, [{"migration": op.pk}], []) == []
    assert calls == [("h1", "inspect")]  # both hosts asked; nothing removed


def test_the_tidy_removes_leftovers_once_the_named_host_is_confirmed_to_run_it(world, monkeypatch):
    source, target, c, op = world
    Container.objects.filter(pk=c.pk).update(state="RUNNING")
    calls = _agent(monkeypatch, {"h1": {"exists": True, "state": "RUNNING"}})
    assert handlers.tidy_migrations(target, [{"migration": op.pk}], []) == [op.pk]
    assert calls == [("h1", "inspect"), ("h2", "migrate-abort")]
    calls.clear()
    assert handlers.tidy_migrations(source, [{"migration": op.pk}], [{"name": "c1", "state": "RUNNING"}]) == [op.pk]
    assert calls == [("h1", "migrate-cleanup")]


def test_the_record_follows_the_host_that_runs_it_audited_and_nothing_is_removed(world, monkeypatch):
    """The target restored it but the answer was lost, and the source does not run it: the
    hosts win. The record moves to the target, the move is audited, the disagreement stays."""
    from core.models import AuditEntry

    source, target, c, op = world
    calls = _agent(monkeypatch, {"h1": {"exists": True, "state": "STOPPED"}})
    assert handlers.tidy_migrations(target, [{"migration": op.pk}], [{"name": "c1", "state": "RUNNING"}]) == []
    assert calls == [("h1", "inspect")]  # asked, nothing removed anywhere
    c.refresh_from_db()
    assert (c.host, c.state) == (target, "RUNNING")
    op.refresh_from_db()
    assert "the record now follows h2" in op.result["disagreement"]
    entry = AuditEntry.objects.get(action="container.follow_host")
    assert entry.object_name == "c1" and f"migration {op.pk}: h1 -> h2" in entry.detail
    # The source's stopped copy and dump go only once the target, asked again, runs it.
    calls = _agent(monkeypatch, {"h2": {"exists": True, "state": "FROZEN"}})
    assert handlers.tidy_migrations(source, [{"migration": op.pk}], [{"name": "c1", "state": "STOPPED"}]) == []
    assert calls == [("h2", "inspect")]
    calls = _agent(monkeypatch, {"h2": {"exists": True, "state": "RUNNING"}})
    assert handlers.tidy_migrations(source, [{"migration": op.pk}], [{"name": "c1", "state": "STOPPED"}]) == [op.pk]
    assert calls == [("h2", "inspect"), ("h1", "migrate-cleanup")]


def test_a_moved_containers_source_copy_whose_clean_up_got_no_answer_is_removed_later(world, monkeypatch):
    """A migration that succeeded while the link to its source was down at the end (the full
    matrix's link-source cuts in the restore: `the source copy could not be removed`) left the
    stopped copy and its dump there: two hosts listed the container. The tidy removes them once
    the target, asked now, runs it; never while the source runs it."""
    source, target, c, op = world
    Operation.objects.filter(pk=op.pk).update(status="success")
    Container.objects.filter(pk=c.pk).update(host=target, state="RUNNING")
    calls = _agent(monkeypatch, {"h2": {"exists": True, "state": "RUNNING"}})
    assert handlers.tidy_migrations(source, [{"migration": op.pk}], [{"name": "c1", "state": "RUNNING"}]) == []
    assert calls == []  # it runs here too: nothing is removed on a guess
    assert handlers.tidy_migrations(source, [{"migration": op.pk}], [{"name": "c1", "state": "STOPPED"}]) == [op.pk]
    assert calls == [("h2", "inspect"), ("h1", "migrate-cleanup")]


def test_when_both_hosts_run_it_nothing_moves_and_nothing_is_removed(world, monkeypatch):
    source, target, c, op = world
    calls = _agent(monkeypatch, {"h1": {"exists": True, "state": "RUNNING"}})
    assert handlers.tidy_migrations(target, [{"migration": op.pk}], [{"name": "c1", "state": "RUNNING"}]) == []
    assert calls == [("h1", "inspect")]
    assert Container.objects.get(pk=c.pk).host == source
    op.refresh_from_db()
    assert "and so does h1" in op.result["disagreement"]


def test_a_copy_an_admin_superseded_is_removed_once_the_source_runs_it(world, monkeypatch):
    """A post-copy resumed on its source by an admin's decision: the target's copy, even
    running, is never followed; it is stopped and removed once the source is confirmed running."""
    source, target, c, op = world
    Operation.objects.filter(pk=op.pk).update(result={"superseded": {"host": "h2", "clean": False}})
    calls = _agent(monkeypatch, {"h1": {"exists": True, "state": "FROZEN"}})
    assert handlers.tidy_migrations(target, [{"migration": op.pk}], [{"name": "c1", "state": "RUNNING"}]) == []
    assert calls == [("h1", "inspect")]  # the source does not run it (yet): the copy stays
    assert Container.objects.get(pk=c.pk).host == source
    calls = _agent(monkeypatch, {"h1": {"exists": True, "state": "RUNNING"}})
    assert handlers.tidy_migrations(target, [{"migration": op.pk}], [{"name": "c1", "state": "RUNNING"}]) == [op.pk]
    assert calls == [("h1", "inspect"), ("h2", "migrate-abort")]
    assert Container.objects.get(pk=c.pk).host == source


def test_admins_see_the_disagreement_on_the_host_and_container_pages_and_in_the_api(world, monkeypatch, users, tokens):
    from django.test import Client

    source, target, c, op = world
    _agent(monkeypatch, {"h1": {"exists": True, "state": "STOPPED"}})
    handlers.tidy_migrations(target, [{"migration": op.pk}], [{"name": "c1", "state": "RUNNING"}])
    api = Client(HTTP_AUTHORIZATION=f"Token {tokens['carol']}")  # a viewer sees it too
    for url in ("/api/v1/containers/c1/", "/api/v1/hosts/h2/", "/api/v1/hosts/h1/"):
        got = api.get(url).json()["disagreements"]
        assert [d["migration"] for d in got] == [op.pk], (url, got)
        assert "the record now follows h2" in got[0]["sentence"]
    page = Client()
    page.force_login(users["alice"])
    for url in ("/containers/c1/", "/hosts/h2/"):
        html = page.get(url).content.decode()
        assert 'id="disagreements"' in html and "the record now follows h2" in html, url
