"""The audit log: every change leaves an entry, and no entry can be changed or deleted.

The route walk takes every state-changing route (POST/PUT/PATCH/DELETE) from the matrix of
tests/security/test_authz_matrix.py, which `test_every_route_is_in_the_matrix` keeps equal to what
Django's URL resolver serves, so a new route is walked here too without anyone adding it.
"""

import json

import pytest
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.sessions.models import Session
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.test import Client

from core.models import AuditEntry
from hosts.models import Host
from tests.support.authz import API, MATRIX, _url  # noqa: F401
from tests.support.helpers import db_state

# Who asks: the least user each route permits (anonymous for the login form).
WHO = {"public": "anonymous", "login": "carol", "viewer": "carol", "operator": "bob", "admin": "alice"}
WHO_BY_ROUTE = {"accounts/logout/": "carol"}
# Bodies that make the matrix's refused-or-harmless requests into real changes.
BODIES = {
    ("accounts/login/", "post"): {"username": "carol", "password": "carol-password-1"},
    ("hosts/<str:name>/delete", "post"): {"confirm": "otherhost"},  # at /hosts/otherhost/delete (PATHS)
    ("users/<id:user_id>/update", "post"): {"action": "role", "role": "operator"},
}
PATHS = {("hosts/<str:name>/delete", "post"): "/hosts/otherhost/delete"}  # a host without containers
WRITES = [(r, m, spec) for r, m, spec in MATRIX if m != "get"]
# Routes whose request here cannot change anything (an unreachable host): each still writes
# an entry if it does (the assertion holds for every route), but is not required to change.
NO_CHANGE_HERE = {
    ("hosts/add/", "post"),  # a bad name: refused before anything
    ("hosts/<str:name>/probe", "post"),  # a probe of it is pending already: this joins it
    ("api/v1/hosts/<str:name>/probe", "post"),
    ("hosts/<str:name>/trust", "post"),  # the fingerprint is not what the host presents
    ("api/v1/hosts/", "post"),
    ("api/v1/hosts/<str:name>/", "delete"),  # 409: it has containers
    ("api/v1/hosts/<str:name>/trust", "post"),
    # the operation waits for no decision here (409); a decision taken is audited:
    # tests/operations/test_waiting.py::test_an_admin_decision_is_checked_audited_and_runs_the_kinds_decision_handler
    ("operations/<id:op_id>/decide", "post"),
    ("api/v1/operations/<id:op_id>/decide", "post"),
    # the world's container is stopped (409); a check queued is audited:
    # tests/containers/test_check.py::test_a_check_is_queued_for_an_operator_and_audited
    ("api/v1/containers/<str:name>/check", "post"),
    # no archive in the form (400); an import queued from the page is audited:
    # tests/api/test_export_import_api.py::test_the_import_page_takes_an_uploaded_archive_as_a_new_container
    ("containers/import/", "post"),
}


def _sessions():
    return sorted(Session.objects.values_list("session_key", "session_data"))


def _without_audit(state):
    return {k: v for k, v in state.items() if k != "core.AuditEntry"}


@pytest.mark.parametrize("route,method,spec", WRITES, ids=[f"{m.upper()} /{r}" for r, m, _ in WRITES])
def test_every_change_through_every_route_is_audited(
    route,
    method,
    spec,
    world,  # noqa: F811  (the matrix's fixture)
    django_capture_on_commit_callbacks,
):
    needs, body, _ = spec
    user = WHO_BY_ROUTE.get(route, WHO[needs])
    body = BODIES.get((route, method), body)
    api = route in API
    cache.clear()
    with transaction.atomic():
        c, headers = Client(raise_request_exception=False), {}
        if api and user != "anonymous":
            headers["HTTP_AUTHORIZATION"] = f"Token {world['tokens'][user]}"
        elif user != "anonymous":
            c.force_login(world["users"][user])  # before the snapshot: logging in is not the request
        path = PATHS.get((route, method)) or _url(route, world, user)
        before, sessions, audits = db_state(), _sessions(), AuditEntry.objects.count()
        with django_capture_on_commit_callbacks() as callbacks:
            if api and body is not None:
                r = getattr(c, method)(path, json.dumps(body), content_type="application/json", **headers)
            elif body is not None:
                r = getattr(c, method)(path, body, **headers)
            else:
                r = getattr(c, method)(path, **headers)
        changed = _without_audit(db_state()) != _without_audit(before) or _sessions() != sessions or callbacks
        new = list(AuditEntry.objects.order_by("-pk")[: AuditEntry.objects.count() - audits])
        transaction.set_rollback(True)
    assert r.status_code < 500, (route, r.status_code)
    if (route, method) not in NO_CHANGE_HERE:
        assert changed, (route, method, r.status_code, "this request was meant to change something")
    if changed:
        assert new, (route, method, "changed something without an audit entry")
        assert all(e.action and e.outcome for e in new)
        if user != "anonymous":
            assert any(e.username == user for e in new), [(e.username, e.action) for e in new]


def test_logins_and_logouts_are_audited_with_who_and_where(users):
    cache.clear()
    c = Client(REMOTE_ADDR="198.51.100.40")
    assert c.post("/accounts/login/", {"username": "carol", "password": "carol-password-1"}).status_code == 302
    assert c.post("/accounts/logout/").status_code == 302
    login, logout = AuditEntry.objects.order_by("pk").filter(action__in=["login", "logout"])
    assert (login.action, login.username, login.object_name, login.outcome) == ("login", "carol", "carol", "ok")
    assert (logout.action, logout.username, logout.outcome) == ("logout", "carol", "ok")
    assert login.remote_addr == logout.remote_addr == "198.51.100.40"
    # An anonymous logout ends nothing and is not an entry.
    assert Client().post("/accounts/logout/").status_code == 302
    assert AuditEntry.objects.filter(action="logout").count() == 1


# --- the Django admin site ---------------------------------------------------------------


@pytest.fixture
def staff(db):
    cache.clear()
    root = get_user_model().objects.create_superuser("root", password="root-password-1")
    c = Client()
    c.force_login(root)
    return c


def test_no_model_admin_skips_the_audit_hook():
    """Admin changes are audited through ModelAdmin.log_addition/log_change/log_deletions
    (core/admin.py): no registered ModelAdmin may replace them."""
    assert len(admin.site._registry) >= 7
    for model, model_admin in admin.site._registry.items():
        for name in ("log_addition", "log_change", "log_deletions", "log_deletion"):
            assert getattr(type(model_admin), name) is getattr(admin.ModelAdmin, name), (model, name)


def test_admin_site_additions_changes_and_deletions_are_audited(staff):
    assert staff.post("/admin/auth/group/add/", {"name": "ops-team"}).status_code == 302
    group = Group.objects.get(name="ops-team")
    r = staff.post(f"/admin/auth/group/{group.pk}/change/", {"name": "ops-team-2"})
    assert r.status_code == 302
    assert staff.post(f"/admin/auth/group/{group.pk}/delete/", {"post": "yes"}).status_code == 302
    others = [Group.objects.create(name=f"bulk{i}") for i in range(2)]
    r = staff.post(
        "/admin/auth/group/",
        {"action": "delete_selected", "_selected_action": [g.pk for g in others], "post": "yes"},
    )
    assert r.status_code == 302 and not Group.objects.filter(name__startswith="bulk").exists()
    entries = list(AuditEntry.objects.filter(action__startswith="admin.").order_by("pk"))
    assert [(e.action, e.object_type, e.username) for e in entries] == [
        ("admin.add", "auth.group", "root"),
        ("admin.change", "auth.group", "root"),
        ("admin.delete", "auth.group", "root"),
        ("admin.delete", "auth.group", "root"),
        ("admin.delete", "auth.group", "root"),
    ]
    assert "ops-team-2" in entries[2].object_name and "Changed Name" in entries[1].detail
    assert LogEntry.objects.count() == 5  # Django's own admin log is kept as well


# --- entries are written once --------------------------------------------------------------


def _entry():
    return AuditEntry.objects.create(action="host.probe", object_type="host", object_name="h1", username="bob")


def test_an_entry_cannot_be_changed_or_deleted_through_the_model(db):
    e = _entry()
    e.outcome = "failed"
    with pytest.raises(PermissionError):
        e.save()
    with pytest.raises(PermissionError):
        e.delete()
    with pytest.raises(PermissionError):
        AuditEntry.objects.filter(pk=e.pk).update(outcome="failed")
    with pytest.raises(PermissionError):
        AuditEntry.objects.all().delete()
    same_pk = AuditEntry(pk=e.pk, action="forged")
    with pytest.raises(IntegrityError):  # an insert with a taken pk: never an update of the old row
        with transaction.atomic():
            same_pk.save()
    assert AuditEntry.objects.get(pk=e.pk).outcome == "ok"
    assert AuditEntry.objects.get(pk=e.pk).action == "host.probe"


def test_deleting_a_user_keeps_their_entries(db):
    u = get_user_model().objects.create_user("erin", password="erin-password-1")
    AuditEntry.objects.create(user=u, username="erin", action="token.create")
    u.delete()
    e = AuditEntry.objects.get(action="token.create")
    assert e.user is None and e.username == "erin"


def test_the_admin_site_shows_entries_but_cannot_add_change_or_delete_them(staff):
    e = _entry()
    assert staff.get("/admin/core/auditentry/").status_code == 200
    page = staff.get(f"/admin/core/auditentry/{e.pk}/change/")
    assert page.status_code == 200 and b'name="action"' not in page.content  # read only
    assert staff.post(f"/admin/core/auditentry/{e.pk}/change/", {"action": "x", "outcome": "x"}).status_code == 403
    assert staff.post(f"/admin/core/auditentry/{e.pk}/delete/", {"post": "yes"}).status_code == 403
    assert staff.post("/admin/core/auditentry/add/", {"action": "x"}).status_code == 403
    r = staff.post("/admin/core/auditentry/", {"action": "delete_selected", "_selected_action": [e.pk], "post": "yes"})
    assert r.status_code in (200, 302)
    e2 = AuditEntry.objects.get(pk=e.pk)
    assert (e2.action, e2.outcome) == ("host.probe", "ok")


# --- host keys only through the trust step ------------------------------------------------

KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIGbXYqIV8bzRLxNfJ6vHR5cP2xvQ6QFqD7PbSqPXW0Mg"
EVIL = "AAAAC3NzaC1lZDI1NTE5AAAAIEvilEvilEvilEvilEvilEvilEvilEvilEvilEvil0"
KEY_FIELDS = {
    "key_type": "ssh-ed25519", "key_data": EVIL, "fingerprint": "SHA256:evil", "status": "online",
    "offered_key_type": "ssh-ed25519", "offered_key_data": EVIL, "offered_fingerprint": "SHA256:evil",
}  # fmt: skip


def _host_form(**extra):
    form = {"name": "h2", "address": "127.0.0.2", "port": "22", "username": "root"}
    return {**form, "created_at_0": "2026-12-01", "created_at_1": "00:00:00", **extra}


def test_the_admin_site_cannot_set_a_host_key(staff):
    r = staff.post("/admin/hosts/host/add/", _host_form(**KEY_FIELDS))
    assert r.status_code == 302, r.content[:2000]
    h = Host.objects.get(name="h2")
    assert (h.key_type, h.key_data, h.fingerprint, h.offered_key_data, h.status) == ("", "", "", "", "untrusted")
    assert not h.is_trusted


def test_the_admin_site_cannot_change_a_pinned_host_key(staff):
    h = Host.objects.create(
        name="h1", address="127.0.0.1", port=1, status=Host.Status.KEY_MISMATCH, key_type="ssh-ed25519",
        key_data=KEY, fingerprint="SHA256:x", offered_key_type="ssh-ed25519", offered_key_data=EVIL,
        offered_fingerprint="SHA256:evil",
    )  # fmt: skip
    page = staff.get(f"/admin/hosts/host/{h.pk}/change/").content.decode()
    for field in ("key_data", "key_type", "fingerprint", "status"):
        assert f'name="{field}"' not in page, field
    r = staff.post(f"/admin/hosts/host/{h.pk}/change/", _host_form(name="h1", address="127.0.0.3", **KEY_FIELDS))
    assert r.status_code == 302, r.content[:2000]
    h.refresh_from_db()
    assert h.address == "127.0.0.3"  # what is not a key still changes
    assert (h.key_data, h.fingerprint, h.status) == (KEY, "SHA256:x", Host.Status.KEY_MISMATCH)
    entry = AuditEntry.objects.get(action="admin.change")
    assert entry.object_type == "hosts.host" and "Address" in entry.detail and json.dumps(entry.detail)


def test_a_deletion_of_any_model_through_the_admin_site_is_audited(world, staff):  # noqa: F811
    """Every model the admin site serves, one object each, deleted through its delete page:
    each deletion leaves an `admin.delete` entry naming the model, except audit entries,
    which cannot be deleted at all."""
    AuditEntry.objects.create(action="host.probe", username="bob")
    deleted = []
    first = ["containers.snapshot", "operations.operation", "containers.container"]  # before what they hang on
    models = sorted(admin.site._registry, key=lambda m: (first + [m._meta.label_lower]).index(m._meta.label_lower))
    for model in models:
        qs = model._default_manager.order_by("-pk")
        obj = (qs.exclude(username="root") if model is get_user_model() else qs).first()  # not the one deleting
        assert obj is not None, model
        label = f"{model._meta.app_label}.{model._meta.model_name}"
        before = AuditEntry.objects.filter(action="admin.delete").count()
        r = staff.post(f"/admin/{model._meta.app_label}/{model._meta.model_name}/{obj.pk}/delete/", {"post": "yes"})
        if model is AuditEntry:
            assert r.status_code == 403 and model.objects.filter(pk=obj.pk).exists()
            continue
        assert r.status_code == 302, (label, r.status_code)
        assert not model._default_manager.filter(pk=obj.pk).exists(), label
        new = AuditEntry.objects.filter(action="admin.delete").order_by("pk")[before:]
        assert [e.object_type for e in new] == [label], label
        assert new[0].username == "root" and new[0].object_name.startswith(f"{obj.pk}: ")
        deleted.append(label)
    assert len(deleted) == len(admin.site._registry) - 1
