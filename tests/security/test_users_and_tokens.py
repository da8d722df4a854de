"""Admins manage users and roles from the dashboard; tokens are hashed and revocable."""

import hashlib
from io import StringIO

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client

from core.models import ApiToken, AuditEntry
from core.roles import role_of

User = get_user_model()


def _admin(users):
    c = Client()
    c.force_login(users["alice"])
    return c


def test_an_admin_creates_a_user_with_a_role(users):
    r = _admin(users).post("/users/create", {"username": "erin", "password": "a-long-passphrase-9", "role": "operator"})
    assert r.status_code == 302
    erin = User.objects.get(username="erin")
    assert role_of(erin) == "operator"
    assert Client().login(username="erin", password="a-long-passphrase-9")
    assert AuditEntry.objects.filter(action="user.create", object_name="erin").exists()


def test_an_admin_refuses_a_weak_password(users):
    _admin(users).post("/users/create", {"username": "erin", "password": "123", "role": "viewer"})
    assert not User.objects.filter(username="erin").exists()


def test_an_admin_changes_a_role_deactivates_and_resets_a_password(users):
    c = _admin(users)
    carol = users["carol"]
    c.post(f"/users/{carol.pk}/update", {"action": "role", "role": "operator"})
    assert role_of(User.objects.get(pk=carol.pk)) == "operator"
    c.post(f"/users/{carol.pk}/update", {"action": "password", "password": "another-long-pass-7"})
    assert Client().login(username="carol", password="another-long-pass-7")
    c.post(f"/users/{carol.pk}/update", {"action": "deactivate"})
    assert not Client().login(username="carol", password="another-long-pass-7")
    actions = set(AuditEntry.objects.values_list("action", flat=True))
    assert {"user.role", "user.password", "user.deactivate"} <= actions


def test_an_admin_cannot_demote_themself(users):
    _admin(users).post(f"/users/{users['alice'].pk}/update", {"action": "role", "role": "viewer"})
    assert role_of(User.objects.get(pk=users["alice"].pk)) == "admin"


def test_non_admins_cannot_manage_users(users):
    c = Client()
    c.force_login(users["bob"])
    assert c.post("/users/create", {"username": "x", "password": "a-long-passphrase-9"}).status_code == 403
    assert c.post(f"/users/{users['carol'].pk}/update", {"action": "deactivate"}).status_code == 403
    assert User.objects.get(pk=users["carol"].pk).is_active


def test_tokens_are_stored_hashed_and_shown_once(users):
    c = Client()
    c.force_login(users["carol"])
    r = c.post("/tokens/create", {"name": "script"})
    key = r.context["new_key"]
    token = ApiToken.objects.get(user=users["carol"])
    assert token.digest == hashlib.sha256(key.encode()).hexdigest()
    assert key not in {token.digest, token.prefix, token.name}
    assert Client().get("/api/v1/hosts/", HTTP_AUTHORIZATION=f"Token {key}").status_code == 200
    assert key.encode() not in c.get("/tokens/").content
    c.post(f"/tokens/{token.pk}/revoke")
    assert Client().get("/api/v1/hosts/", HTTP_AUTHORIZATION=f"Token {key}").status_code == 401


def test_users_cannot_revoke_each_others_tokens(users):
    token, key = ApiToken.issue(users["bob"])
    c = Client()
    c.force_login(users["carol"])
    assert c.post(f"/tokens/{token.pk}/revoke").status_code == 404
    assert ApiToken.objects.filter(pk=token.pk).exists()


def test_issue_token_prints_a_working_token(users):
    out = StringIO()
    call_command("issue_token", "carol", stdout=out)
    key = out.getvalue().strip()
    assert Client().get("/api/v1/hosts/", HTTP_AUTHORIZATION=f"Token {key}").status_code == 200


def test_ensure_admin_creates_one_admin_once(db):
    out = StringIO()
    call_command("ensure_admin", stdout=out)
    assert "Log in as  admin  /  " in out.getvalue()
    call_command("ensure_admin", stdout=(again := StringIO()))
    assert "exists already" in again.getvalue()
    assert User.objects.filter(is_superuser=True).count() == 1
    assert role_of(User.objects.get(username="admin")) == "admin"


def test_state_changing_requests_are_audited(users, tokens, trusted_host):
    Client().post("/api/v1/hosts/h1/probe", HTTP_AUTHORIZATION=f"Token {tokens['bob']}")
    entry = AuditEntry.objects.get(action="host.probe")
    assert (entry.username, entry.object_type, entry.object_name) == ("bob", "host", "h1")


def test_the_audit_log_filters_by_user_action_and_date(users, tokens, trusted_host):
    Client().post("/api/v1/hosts/h1/probe", HTTP_AUTHORIZATION=f"Token {tokens['bob']}")
    _admin(users).post("/users/create", {"username": "erin", "password": "a-long-passphrase-9", "role": "viewer"})
    c = _admin(users)
    page = c.get("/audit/?user=bob").content.decode()
    assert "host.probe" in page and "user.create" not in page
    page = c.get("/audit/?action=user.").content.decode()
    assert "user.create" in page and "host.probe" not in page
    assert "No entries match" in c.get("/audit/?since=2999-01-01").content.decode()
