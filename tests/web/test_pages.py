"""Server-rendered lists: filters, paging that keeps them, and what an empty list says."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from operations.models import Operation


@pytest.fixture
def viewer(users):
    c = Client()
    c.force_login(users["carol"])
    return c


def test_operations_filter_by_kind_host_container_user_and_date(viewer, users, trusted_host):
    old = timezone.now() - timedelta(days=10)
    Operation.objects.create(kind="probe", host=trusted_host, created_by=users["alice"], created_at=old)
    Operation.objects.create(kind="snapshot", host=trusted_host, container_name="web1", created_by=users["bob"])
    Operation.objects.create(kind="migrate", target_host=trusted_host, container_name="db1", created_by=users["bob"])

    def ids(query):
        r = viewer.get("/operations/?" + query)
        assert r.status_code == 200
        return sorted(op.kind for op in r.context["page"].object_list)

    assert ids("kind=snapshot") == ["snapshot"]
    assert ids("host=h1") == ["migrate", "probe", "snapshot"]  # as source or as target
    assert ids("container=db1") == ["migrate"]
    assert ids("created_by=alice") == ["probe"]
    assert ids(f"since={(timezone.now() - timedelta(days=1)).date()}") == ["migrate", "snapshot"]
    assert ids("until=not-a-date") == ["migrate", "probe", "snapshot"]  # said, not crashed
    assert b"until must be a date" in viewer.get("/operations/?until=not-a-date").content


def test_paging_keeps_the_filters(viewer, users, trusted_host):
    Operation.objects.bulk_create(
        [Operation(kind="probe", host=trusted_host, created_by=users["alice"]) for _ in range(60)]
        + [Operation(kind="sync", host=trusted_host) for _ in range(5)]
    )
    r = viewer.get("/operations/?kind=probe&status=pending")
    page = r.context["page"]
    assert page.paginator.count == 60 and page.paginator.num_pages == 2
    assert b'href="?kind=probe&amp;status=pending&amp;page=2"' in r.content
    r = viewer.get("/operations/?kind=probe&status=pending&page=2")
    assert len(r.context["page"].object_list) == 10


def test_empty_lists_say_what_to_do(viewer, users):
    assert b"No hosts yet" in viewer.get("/").content
    assert b"Ask an admin" in viewer.get("/containers/").content
    assert b"No snapshots yet" in viewer.get("/snapshots/").content
    admin = Client()
    admin.force_login(users["alice"])
    body = admin.get("/hosts/").content
    assert b"No hosts yet" in body and b'href="/hosts/add/"' in body
