"""The fleet lists cost the same number of SQL queries with 5 containers as with 50: no query per row.
(Their time at 10,000 containers on PostgreSQL is measured by bench/fleet.py.)"""

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from containers.models import Container, Snapshot
from operations.models import Operation

PATHS = [
    "/",
    "/hosts/",
    "/hosts/h1/",
    "/operations/?kind=stop&host=h1&since=2026-01-01",
    "/containers/",
    "/containers/?host=h1&state=RUNNING",
    "/snapshots/",
    "/snapshots/?q=c00",
    "/operations/",
    "/containers/c000/history/",
    "/api/v1/containers/",
    "/api/v1/containers/?host=h1",
    "/api/v1/snapshots/",
    "/api/v1/snapshots/?q=c00",
    "/api/v1/snapshots/?host=h1",
    "/api/v1/containers/c000/snapshots/",
    "/api/v1/operations/",
    "/api/v1/operations/?container=c000",
]


def fill(host, users, start: int, stop: int) -> None:
    """Containers c{start}..c{stop-1}, each with 2 snapshots and 3 operations, every third one running."""
    for i in range(start, stop):
        c = Container.objects.create(name=f"c{i:03d}", host=host, state="RUNNING", ipv4=f"10.9.8.{i}")
        for s in range(2):
            Snapshot.objects.create(container=c, name=f"snap{s}", created_by=users["bob"], stats={"frozen_time": 9})
        for kind, status in [("create", "success"), ("snapshot", "failure"), ("stop", "success")]:
            if kind == "stop" and i % 3 == 0:
                status = "running"
            Operation.objects.create(
                kind=kind, status=status, container=c, container_name=c.name, host=host, created_by=users["bob"]
            )


def queries(client: Client, path: str) -> int:
    client.get(path)  # a token's first use in a minute writes its last-used time once; not counted
    with CaptureQueriesContext(connection) as q:
        r = client.get(path)
    assert r.status_code == 200, (path, r.status_code)
    return len(q.captured_queries)


@pytest.fixture
def clients(users, tokens):
    page = Client()
    page.force_login(users["carol"])
    return {"page": page, "api": Client(HTTP_AUTHORIZATION=f"Token {tokens['carol']}")}


@pytest.mark.parametrize("path", PATHS)
def test_list_queries_do_not_grow_with_rows(clients, users, trusted_host, path):
    client = clients["api" if path.startswith("/api/") else "page"]
    fill(trusted_host, users, 0, 5)
    few = queries(client, path)
    fill(trusted_host, users, 5, 50)
    assert queries(client, path) == few


def test_the_container_list_says_what_each_container_page_says(clients, users, trusted_host):
    # The list is read without the serializer (it is up to 1000 rows); each row must still match it.
    fill(trusted_host, users, 0, 4)
    Container.objects.create(name="bare", host=trusted_host, state="STOPPED", command="sh -c true")
    api = clients["api"]
    rows = api.get("/api/v1/containers/").json()
    assert [r["name"] for r in rows] == ["bare", "c000", "c001", "c002", "c003"]
    assert [r["snapshots"] for r in rows] == [0, 2, 2, 2, 2]
    assert [bool(r["operation"]) for r in rows] == [False, True, False, False, True]
    for row in rows:
        detail = api.get(f"/api/v1/containers/{row['name']}/").json()
        assert detail.pop("disagreements") == []  # the page alone lists them (tests/hosts/test_tidy.py)
        assert row == detail


def test_snapshot_search_matches_snapshot_or_container_names(clients, users, trusted_host):
    fill(trusted_host, users, 0, 3)
    Snapshot.objects.create(container=Container.objects.get(name="c002"), name="c001-copy")
    api = clients["api"]

    def found(q):
        return sorted((s["container"], s["name"]) for s in api.get(f"/api/v1/snapshots/?q={q}").json())

    assert found("C001") == [("c001", "snap0"), ("c001", "snap1"), ("c002", "c001-copy")]
    assert found("copy") == [("c002", "c001-copy")]
    assert found("nothing") == []
