"""Export and import requests, the dashboard's side (the archives themselves:
tests/agent/test_export_archive.py; the real thing: tests/containers/test_e2e_lab_export.py)."""

import io
import json
import os
import time
from datetime import timedelta

import pytest
from django.core.files.storage import storages
from django.test import Client
from django.utils import timezone

from containers.exports import expire_exports, export_file
from containers.models import Container, Snapshot
from core.models import AuditEntry
from hosts.models import Host
from operations import runner
from operations.models import Operation


@pytest.fixture
def world(trusted_host, settings, tmp_path):
    settings.STORAGES = {
        **settings.STORAGES,
        "exports": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": tmp_path}},
    }
    Host.objects.filter(pk=trusted_host.pk).update(
        capabilities={"network": {"subnet": "10.9.9.0/24", "bridge": "lxcbr0", "range": [100, 120]}}
    )
    c1 = Container.objects.create(name="c1", host=trusted_host, state="RUNNING", ipv4="10.9.9.100")
    Snapshot.objects.create(container=c1, name="s1", stateful=True)
    return tmp_path


def _auth(tokens, who="bob"):
    return {"HTTP_AUTHORIZATION": f"Token {tokens[who]}"}


def _upload(tokens, data: bytes, name="c2", host="h1", who="bob"):
    f = io.BytesIO(data)
    f.name = "a.tar"
    return Client().post("/api/v1/imports", {"name": name, "host": host, "archive": f}, **_auth(tokens, who))


def test_an_export_is_an_operation_on_the_snapshots_container(tokens, world):
    r = Client().post("/api/v1/containers/c1/snapshots/s1/export", **_auth(tokens))
    assert r.status_code == 202
    op = Operation.objects.get(pk=r.json()["id"])
    assert (op.kind, op.container_name, op.params) == ("export", "c1", {"snapshot": "s1"})
    r = Client().post("/api/v1/containers/c1/snapshots/nope/export", **_auth(tokens))
    assert r.status_code == 404


@pytest.mark.parametrize(
    "body,status,field",
    [
        ({"name": "c2", "host": "h1", "export": 999}, 400, "export"),  # no such kept export
        ({"name": "c2", "host": "h1"}, 400, "export"),
        ({"name": "c1", "host": "h1", "export": 999}, 409, "name"),  # taken
        ({"name": "../x", "host": "h1", "export": 1}, 400, "name"),
        ({"name": "c2", "host": "nohost", "export": 1}, 400, "host"),
        ({"name": "c2", "host": "h1", "export": "1"}, 400, "export"),
        ({"name": "c2", "export": 1}, 400, "host"),
        ({"container": "nope", "export": 1}, 400, "container"),
        ({"container": "c1", "name": "c2", "host": "h1", "export": 1}, 400, "container"),
        ({"container": "c1", "export": 999}, 400, "export"),
    ],
)
def test_a_bad_import_request_gets_a_sentence_and_reserves_nothing(tokens, world, body, status, field):
    r = Client().post("/api/v1/imports", json.dumps(body), content_type="application/json", **_auth(tokens))
    assert (r.status_code, r.json()["field"]) == (status, field), r.json()
    assert r.json()["error"].endswith(".")
    assert list(Container.objects.values_list("name", flat=True)) == ["c1"]
    assert not Operation.objects.filter(kind="import").exists()


def test_an_upload_is_kept_until_its_import_ends_and_a_cancel_gives_everything_back(tokens, world):
    r = _upload(tokens, b"not even a tar")
    assert r.status_code == 202, r.content
    op = Operation.objects.get(pk=r.json()["id"])
    assert op.kind == "import" and op.params["upload"] is True
    assert storages["exports"].exists(op.params["archive"])
    c2 = Container.objects.get(name="c2")
    assert (c2.state, c2.ipv4) == ("CREATING", "10.9.9.101")  # reserved, with an address, as a create
    r = Client().post(f"/api/v1/operations/{op.pk}/cancel", **_auth(tokens))
    assert r.status_code == 202
    assert not Container.objects.filter(name="c2").exists()
    assert not storages["exports"].exists(op.params["archive"])


def test_a_bad_archive_fails_its_import_on_the_dashboard_before_any_host_is_asked(tokens, world):
    r = _upload(tokens, b"PK\x03\x04 a zip, not an export" + b"\0" * 4096)
    op = Operation.objects.get(pk=r.json()["id"])
    assert runner.run_operation(op.pk) == "failure"
    op.refresh_from_db()
    assert op.error.startswith("The archive was refused: The archive is cut short or damaged, or not a tar"), op.error
    assert not Container.objects.filter(name="c2").exists()  # the reservation went
    assert not storages["exports"].exists(op.params["archive"])  # and the upload
    # The host was never asked: asking it (port 1 refuses) would have marked it offline.
    assert Host.objects.get(name="h1").status == Host.Status.ONLINE


def test_an_upload_past_the_limit_is_refused_unread(tokens, world, settings):
    settings.EXPORT_MAX_BYTES = 1000
    r = _upload(tokens, b"x" * 200_000)
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    assert not Container.objects.filter(name="c2").exists()


def test_other_routes_still_take_at_most_256_kib(tokens, world):
    f = io.BytesIO(b"x" * 300_000)
    f.name = "a.tar"
    r = Client().post("/api/v1/containers/", {"name": "c2", "host": "h1", "archive": f}, **_auth(tokens))
    assert r.status_code == 413


def test_a_viewer_may_neither_import_nor_download(tokens, world):
    assert _upload(tokens, b"x", who="carol").status_code == 403
    assert Client().get("/api/v1/exports/1", **_auth(tokens, "carol")).status_code == 403
    assert not Container.objects.filter(name="c2").exists()


def _page_client(users, who):
    c = Client()
    c.force_login(users[who])
    return c


def test_the_pages_offer_export_to_operators_and_the_download_once_it_is_kept(users, world):
    bob, carol = _page_client(users, "bob"), _page_client(users, "carol")
    assert b"Export s1" in bob.get("/containers/c1/").content
    assert b"Export" not in carol.get("/containers/c1/").content
    r = bob.post("/containers/c1/snapshots/s1/export")
    op = Operation.objects.get(kind="export")
    assert r.status_code == 302 and r["Location"] == f"/operations/{op.pk}/"
    Operation.objects.filter(pk=op.pk).update(
        status="success",
        result={"download": f"/api/v1/exports/{op.pk}", "bytes": 10, "sha256": "ab", "file_name": "x.tar"},
    )
    assert f'id="export-link" href="/api/v1/exports/{op.pk}"'.encode() in bob.get(f"/operations/{op.pk}/").content
    assert b'id="export-link"' not in carol.get(f"/operations/{op.pk}/").content  # a viewer may not download it
    storages["exports"].save(f"exports/op-{op.pk}.tar", io.BytesIO(b"the archive"))
    r = bob.get(f"/api/v1/exports/{op.pk}")  # with the page's session
    assert r.status_code == 200 and b"".join(r.streaming_content) == b"the archive"
    assert r["Content-Disposition"] == 'attachment; filename="x.tar"'
    assert carol.get(f"/api/v1/exports/{op.pk}").status_code == 403


def test_an_import_into_an_existing_container_is_an_operation_on_it(tokens, world):
    kept = Operation.objects.create(kind="export", status="success", container_name="c1")
    storages["exports"].save(f"exports/op-{kept.pk}.tar", io.BytesIO(b"an archive"))
    body = json.dumps({"container": "c1", "export": kept.pk})
    r = Client().post("/api/v1/imports", body, content_type="application/json", **_auth(tokens))
    assert r.status_code == 202, r.json()
    op = Operation.objects.get(pk=r.json()["id"])
    assert (op.kind, op.container_name, op.params) == (
        "import",
        "c1",
        {"into": True, "archive": f"exports/op-{kept.pk}.tar", "export": kept.pk},
    )
    r = Client().post("/api/v1/imports", body, content_type="application/json", **_auth(tokens))
    assert r.status_code == 409  # one operation per container
    assert list(Container.objects.values_list("name", flat=True)) == ["c1"]  # nothing reserved


def test_a_kept_export_can_be_removed_and_is_then_gone(tokens, world, django_capture_on_commit_callbacks):
    kept = Operation.objects.create(kind="export", status="success", container_name="c1",
                                    result={"download": "/api/v1/exports/1"})  # fmt: skip
    storages["exports"].save(f"exports/op-{kept.pk}.tar", io.BytesIO(b"an archive"))
    assert Client().delete(f"/api/v1/exports/{kept.pk}", **_auth(tokens, "carol")).status_code == 403
    assert storages["exports"].exists(f"exports/op-{kept.pk}.tar")
    with django_capture_on_commit_callbacks(execute=True):
        assert Client().delete(f"/api/v1/exports/{kept.pk}", **_auth(tokens)).status_code == 204
    assert not storages["exports"].exists(f"exports/op-{kept.pk}.tar")
    kept.refresh_from_db()
    assert kept.result["download"] is None and kept.result["archive_deleted_at"]
    assert Client().get(f"/api/v1/exports/{kept.pk}", **_auth(tokens)).status_code == 404
    assert Client().delete(f"/api/v1/exports/{kept.pk}", **_auth(tokens)).status_code == 404


def test_the_export_page_imports_its_archive_as_a_new_container(users, world):
    kept = Operation.objects.create(kind="export", status="success", container_name="c1",
                                    result={"download": "/api/v1/exports/1", "bytes": 1, "sha256": "ab"})  # fmt: skip
    storages["exports"].save(f"exports/op-{kept.pk}.tar", io.BytesIO(b"an archive"))
    bob = _page_client(users, "bob")
    assert b'id="import-form"' in bob.get(f"/operations/{kept.pk}/").content
    r = bob.post(f"/operations/{kept.pk}/import", {"name": "bad name", "host": "h1"})
    assert r.status_code == 302 and r["Location"] == f"/operations/{kept.pk}/"  # back, saying why
    assert not Operation.objects.filter(kind="import").exists() and Container.objects.count() == 1
    r = bob.post(f"/operations/{kept.pk}/import", {"name": "c2", "host": "h1"})
    op = Operation.objects.get(kind="import")
    assert r["Location"] == f"/operations/{op.pk}/" and op.params["export"] == kept.pk
    assert Container.objects.get(name="c2").state == "CREATING"


def test_the_import_page_takes_an_uploaded_archive_as_a_new_container(users, world):
    bob, carol = _page_client(users, "bob"), _page_client(users, "carol")
    assert b"Import an archive" in bob.get("/containers/").content
    assert b"Import an archive" not in carol.get("/containers/").content
    assert carol.get("/containers/import/").status_code == 403
    page = bob.get("/containers/import/")
    assert page.status_code == 200 and b'enctype="multipart/form-data"' in page.content

    def post(name, data=b"x" * 300_000, who=bob):  # larger than the 256 KiB every other page takes
        f = io.BytesIO(data)
        f.name = "a.tar"
        return who.post("/containers/import/", {"name": name, "host": "h1", "archive": f})

    for bad in ("import", "new", "bad name"):  # /containers/import/ and /containers/new/ are pages
        r = post(bad)
        assert r.status_code == 400 and b'id="form-error"' in r.content, bad
    r = bob.post("/containers/import/", {"name": "c2", "host": "h1"})  # no archive
    assert r.status_code == 400 and b"archive to upload" in r.content
    assert not Operation.objects.filter(kind="import").exists() and Container.objects.count() == 1
    assert not (world / "uploads").exists() or not os.listdir(world / "uploads")  # a refused request keeps none
    assert post("c3", who=carol).status_code == 403
    r = post("c2")
    op = Operation.objects.get(kind="import")
    assert r.status_code == 302 and r["Location"] == f"/operations/{op.pk}/"
    assert op.params["upload"] is True and storages["exports"].size(op.params["archive"]) == 300_000
    assert Container.objects.get(name="c2").state == "CREATING"
    entry = AuditEntry.objects.get(action="container.import")
    assert entry.username == "bob" and entry.object_name == "c2"


def test_no_container_may_take_the_name_of_a_page(tokens, world):
    body = json.dumps({"name": "import", "host": "h1", "template": "busybox"})
    r = Client().post("/api/v1/containers/", body, content_type="application/json", **_auth(tokens))
    assert r.status_code == 400 and r.json()["field"] == "name" and "page" in r.json()["error"]
    assert not Container.objects.filter(name="import").exists()


def _aged(world, name: str, hours: float) -> None:
    path = world / name
    t = time.time() - hours * 3600
    os.utime(path, (t, t))


def test_retention_removes_old_export_archives_but_never_one_an_import_reads(
    world, settings, django_capture_on_commit_callbacks
):
    settings.EXPORT_KEEP_DAYS = 7
    now = timezone.now()
    kept = {}
    for label, days in (("old", 8), ("read", 9), ("young", 6)):
        op = Operation.objects.create(kind="export", status="success", container_name="c1",
                                      finished_at=now - timedelta(days=days), result={"download": "x"})  # fmt: skip
        storages["exports"].save(export_file(op.pk), io.BytesIO(b"an archive"))
        kept[label] = op
    Operation.objects.create(kind="import", status="running", container_name="c9",
                             params={"archive": export_file(kept["read"].pk), "export": kept["read"].pk})  # fmt: skip
    failed = Operation.objects.create(kind="export", status="failure", container_name="c1",
                                      finished_at=now - timedelta(days=30))  # fmt: skip
    with django_capture_on_commit_callbacks(execute=True):
        removed = expire_exports(now)
    assert removed["exports"] == [kept["old"].pk]
    assert not storages["exports"].exists(export_file(kept["old"].pk))
    assert storages["exports"].exists(export_file(kept["read"].pk))
    assert storages["exports"].exists(export_file(kept["young"].pk))
    kept["old"].refresh_from_db()
    assert kept["old"].result["download"] is None and kept["old"].result["archive_deleted_at"]
    assert AuditEntry.objects.filter(action="export.expire").count() == 1
    failed.refresh_from_db()
    assert failed.status == "failure"
    assert expire_exports(now) == {"exports": [], "uploads": []}  # nothing twice
    settings.EXPORT_KEEP_DAYS = 0  # keep them all
    assert expire_exports(now + timedelta(days=365)) == {"exports": [], "uploads": []}
    assert storages["exports"].exists(export_file(kept["young"].pk))


def test_retention_removes_forgotten_uploads_after_an_hour_and_never_an_imports_own(world, settings):
    s = storages["exports"]
    names = {k: s.save(f"uploads/{k}.tar", io.BytesIO(b"x")) for k in ("forgotten", "fresh", "reading")}
    _aged(world, names["forgotten"], 2)
    _aged(world, names["reading"], 5)
    Operation.objects.create(kind="import", status="waiting", container_name="c9",
                             params={"archive": names["reading"], "upload": True})  # fmt: skip
    assert expire_exports()["uploads"] == [names["forgotten"]]
    assert not s.exists(names["forgotten"]) and s.exists(names["fresh"]) and s.exists(names["reading"])
