"""Snapshot requests, history filters and comparison (the CRIU work itself is tested on the lab)."""

import datetime

import pytest
from django.test import Client
from django.utils import timezone

from containers.compare import compare_snapshots
from containers.models import Container, Snapshot
from operations.models import Operation


@pytest.fixture
def c1(trusted_host):
    return Container.objects.create(name="c1", host=trusted_host, state="RUNNING", ipv4="10.9.9.100")


def _api(tokens, who="bob"):
    return {"HTTP_AUTHORIZATION": f"Token {tokens[who]}"}


def _post(tokens, path, body=None, who="bob"):
    return Client().post(path, body or {}, content_type="application/json", **_api(tokens, who))


def test_snapshot_names_default_to_snap0_snap1(tokens, c1):
    r = _post(tokens, "/api/v1/containers/c1/snapshots/", {})
    assert r.status_code == 202
    op = Operation.objects.get(pk=r.json()["id"])
    assert op.params == {"snapshot": "snap0", "stateful": True}
    Operation.objects.filter(pk=op.pk).update(status="success")
    Snapshot.objects.create(container=c1, name="snap0")
    r = _post(tokens, "/api/v1/containers/c1/snapshots/", {"stateful": False})
    assert Operation.objects.get(pk=r.json()["id"]).params == {"snapshot": "snap1", "stateful": False}


@pytest.mark.parametrize(
    "body,status,field",
    [({"name": "bad name"}, 400, "name"), ({"name": "../x"}, 400, "name"), ({"stateful": "maybe"}, 400, "stateful")],
)
def test_it_refuses_bad_snapshot_requests(tokens, c1, body, status, field):
    r = _post(tokens, "/api/v1/containers/c1/snapshots/", body)
    assert (r.status_code, r.json()["field"]) == (status, field)
    assert not Operation.objects.exists()


def test_a_taken_snapshot_name_is_refused(tokens, c1):
    Snapshot.objects.create(container=c1, name="keep")
    r = _post(tokens, "/api/v1/containers/c1/snapshots/", {"name": "keep"})
    assert r.status_code == 409 and r.json()["field"] == "name"


def test_a_stateful_snapshot_needs_a_running_container(tokens, c1):
    Container.objects.filter(pk=c1.pk).update(state="STOPPED")
    r = _post(tokens, "/api/v1/containers/c1/snapshots/", {"stateful": True})
    assert r.status_code == 409 and "stateless" in r.json()["error"]
    assert _post(tokens, "/api/v1/containers/c1/snapshots/", {"stateful": False}).status_code == 202


def test_one_operation_per_container(tokens, c1):
    first = _post(tokens, "/api/v1/containers/c1/snapshots/", {})
    second = _post(tokens, "/api/v1/containers/c1/state", {"action": "stop", "stateful": True})
    assert second.status_code == 409
    assert first.json()["url"] in second.json()["error"]


def test_restore_and_delete_name_the_snapshot(tokens, c1):
    Snapshot.objects.create(container=c1, name="s1", stateful=False)
    r = _post(tokens, "/api/v1/containers/c1/snapshots/s1/restore")
    assert Operation.objects.get(pk=r.json()["id"]).params == {"snapshot": "s1", "stateful": False}
    Operation.objects.update(status="success")
    r = Client().delete("/api/v1/containers/c1/snapshots/s1/", **_api(tokens))
    assert (r.status_code, Operation.objects.get(pk=r.json()["id"]).kind) == (202, "delete-snapshot")
    assert Client().get("/api/v1/containers/c1/snapshots/nope/", **_api(tokens)).status_code == 404


def test_state_rules(tokens, c1):
    assert _post(tokens, "/api/v1/containers/c1/state", {"action": "start", "stateful": True}).status_code == 400
    assert _post(tokens, "/api/v1/containers/c1/state", {"action": "start", "discard_state": True}).status_code == 400
    r = _post(tokens, "/api/v1/containers/c1/state", {"action": "stop", "stateful": True})
    assert Operation.objects.get(pk=r.json()["id"]).params == {"stateful": True}


def test_history_filters_and_fleet_search(tokens, users, c1, trusted_host):
    other = Container.objects.create(name="web", host=trusted_host, state="RUNNING")
    old = timezone.now() - datetime.timedelta(days=10)
    Snapshot.objects.create(container=c1, name="a", stateful=True, created_by=users["bob"], created_at=old)
    Snapshot.objects.create(container=c1, name="b", stateful=False, created_by=users["alice"])
    Snapshot.objects.create(container=other, name="nightly", stateful=True, created_by=users["bob"])

    def names(path):
        r = Client().get(path, **_api(tokens, "carol"))
        assert r.status_code == 200, r.content
        return [s["name"] for s in r.json()]

    assert names("/api/v1/containers/c1/snapshots/") == ["b", "a"]  # newest first
    assert names("/api/v1/containers/c1/snapshots/?stateful=true") == ["a"]
    assert names(f"/api/v1/containers/c1/snapshots/?since={timezone.now().date()}") == ["b"]
    assert names("/api/v1/containers/c1/snapshots/?created_by=bob") == ["a"]
    assert names("/api/v1/snapshots/?q=night") == ["nightly"]
    assert names("/api/v1/snapshots/?created_by=bob") == ["nightly", "a"]
    assert Client().get("/api/v1/snapshots/?since=yesterday", **_api(tokens, "carol")).status_code == 400


def _snap(container, name, procs, size=0):
    return Snapshot.objects.create(container=container, name=name, size_bytes=size, contents={"processes": procs})


def test_compare_names_processes_added_gone_and_memory_changes(c1):
    a = _snap(
        c1,
        "a",
        [
            {"pid": 1, "command": "init", "dumped_bytes": 100},
            {"pid": 7, "command": "old-job", "dumped_bytes": 50},
            {"pid": 9, "command": "cache", "dumped_bytes": 4000},
        ],
        size=10,
    )
    b = _snap(
        c1,
        "b",
        [
            {"pid": 1, "command": "init", "dumped_bytes": 300},
            {"pid": 8, "command": "new-job", "dumped_bytes": 10},
            {"pid": 9, "command": "cache", "dumped_bytes": 1000},
        ],
        size=25,
    )
    diff = compare_snapshots(a, b)
    assert diff["processes_added"] == [{"pid": 8, "command": "new-job"}]
    assert diff["processes_gone"] == [{"pid": 7, "command": "old-job"}]
    assert [(m["pid"], m["change_bytes"]) for m in diff["memory_grown"]] == [(1, 200)]
    assert [(m["pid"], m["change_bytes"]) for m in diff["memory_shrunk"]] == [(9, -3000)]
    assert diff["size_change_bytes"] == 15


def test_pages_for_snapshots_render(users, c1):
    _snap(
        c1,
        "a",
        [
            {
                "pid": 1,
                "ppid": 0,
                "command": "sh -c loop",
                "mapped_bytes": 1,
                "dumped_bytes": 1,
                "files": [{"fd": 1, "type": "REG", "path": "/tmp/counter"}],
            }
        ],
    )
    _snap(c1, "b", [])
    c = Client()
    c.force_login(users["carol"])
    for path in (
        "/containers/c1/",
        "/containers/c1/history/",
        "/snapshots/?q=c1",
        "/containers/c1/snapshots/a/",
        "/containers/c1/compare/?a=a&b=b",
    ):
        r = c.get(path)
        assert r.status_code == 200, path
    assert b"sh -c loop" in c.get("/containers/c1/snapshots/a/").content
    assert b"Take snapshot" not in c.get("/containers/c1/").content  # a viewer sees no actions


def test_a_bundle_is_404_until_a_failure_left_one(tokens, c1):
    op = Operation.objects.create(kind="snapshot", container=c1, container_name="c1")
    r = Client().get(f"/api/v1/operations/{op.pk}/bundle", **_api(tokens, "carol"))
    assert r.status_code == 404 and "no debug bundle" in r.json()["error"]


def test_since_and_until_take_whole_days(tokens, c1):
    day = datetime.datetime(2026, 3, 10, tzinfo=datetime.UTC)
    Snapshot.objects.create(container=c1, name="late", created_at=day + datetime.timedelta(hours=23, minutes=59))
    Snapshot.objects.create(container=c1, name="next", created_at=day + datetime.timedelta(days=1))

    def names(query):
        r = Client().get(f"/api/v1/snapshots/?{query}", **_api(tokens, "carol"))
        assert r.status_code == 200, r.content
        return [s["name"] for s in r.json()]

    assert names("until=2026-03-10") == ["late"]
    assert names("since=2026-03-11") == ["next"]
    assert names("since=2026-03-10&until=2026-03-11") == ["next", "late"]
    assert names("since=0001-01-01&until=9999-12-31") == ["next", "late"]
