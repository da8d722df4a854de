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


def test_a_migrations_page_shows_the_client_visible_downtime_beside_criu_s_parts(viewer, users, trusted_host):
    result = {
        "strategy": "stop-and-copy",
        "downtime_ms": 700.0,
        "total_ms": 2000.0,
        "client_downtime_ms": 731.4,
        "client_downtime": {
            "ms": 731.4,
            "from": "its freezer cgroup on h0 left THAWED (the dump froze it)",
            "until": "its address 10.0.0.5 answered ICMP echo on h1",
            "note": "post-copy: its processes fetch their memory from the source as they touch it",
        },
        "phases": {"dump_ms": 300, "transfer_ms": 200, "restore_ms": 200},
        "dump_stats": {"freezing_time": 5000},
    }
    op = Operation.objects.create(
        kind="migrate", target_host=trusted_host, container_name="db1", status="success", result=result
    )
    page = viewer.get(f"/operations/{op.pk}/").content.decode()
    assert 'id="client-downtime"' in page and "Its clients saw it gone for <b>731.4 ms</b>" in page
    assert "until its address 10.0.0.5 answered ICMP echo on h1" in page
    assert "Post-copy: its processes fetch their memory from the source as they touch it." in page
    assert "client-visible downtime (freeze until it answered again" in page
    del result["client_downtime_ms"]
    result["client_downtime"] = {"ms": None, "why": "no answer from its address on h1"}
    Operation.objects.filter(pk=op.pk).update(result=result)
    page = viewer.get(f"/operations/{op.pk}/").content.decode()
    assert "Client-visible downtime not measured: no answer from its address on h1." in page


def test_a_migrations_page_shows_its_paths_and_what_crossed_the_dashboard(viewer, trusted_host):
    transfer = {"images": "direct-tls", "images_encrypted": True, "pages": "direct-tls", "pages_encrypted": True}
    result = {
        "strategy": "post-copy",
        "downtime_ms": 700.0,
        "total_ms": 2000.0,
        "phases": {"dump_ms": 300},
        "bytes_transferred": 300 << 20,
        "dashboard_bytes": 0,
        "transport": "images sent directly",
        "transfer": {**transfer, "pages_why": None},
    }
    op = Operation.objects.create(kind="migrate", target_host=trusted_host, status="success", result=result)
    page = viewer.get(f"/operations/{op.pk}/").content.decode()
    assert "images: direct-tls (encrypted); memory pages: direct-tls (encrypted)</td>" in page
    assert '<tr id="dashboard-bytes"><th scope="row">through the dashboard</th><td>0\xa0bytes' in page
    result["transfer"] = {**transfer, "pages": "ssh-relay", "pages_why": "lab-b: no direct link (refused)"}
    result["dashboard_bytes"] = 256 << 20
    Operation.objects.filter(pk=op.pk).update(result=result)
    page = viewer.get(f"/operations/{op.pk}/").content.decode()
    assert "memory pages: ssh-relay (encrypted), because lab-b: no direct link (refused)</td>" in page
    assert "<td>256.0\xa0MB of the migration" in page
