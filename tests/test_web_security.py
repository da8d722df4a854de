"""Headers, cookies, CSRF and login throttling: what the browser side promises."""

import pytest
from django.core.cache import cache
from django.test import Client

from ctweb.models import AuditEntry


@pytest.fixture(autouse=True)
def _clear_cache():
    cache.clear()
    yield
    cache.clear()


def test_pages_send_a_csp_without_inline_script_and_refuse_framing(users):
    c = Client()
    c.force_login(users["carol"])
    r = c.get("/hosts/")
    csp = r["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert r["X-Frame-Options"] == "DENY"
    assert r["X-Content-Type-Options"] == "nosniff"
    assert b"<script>" not in r.content  # every script is a static file


def test_the_session_cookie_is_httponly(users, db):
    r = Client().post("/accounts/login/", {"username": "carol", "password": "carol-password-1"})
    assert r.status_code == 302
    cookie = r.cookies["sessionid"]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Lax"


def test_forms_need_csrf(users):
    c = Client(enforce_csrf_checks=True)
    c.force_login(users["alice"])
    r = c.post("/users/create", {"username": "mallory", "password": "a-long-passphrase-9", "role": "admin"})
    assert r.status_code == 403
    assert not users["alice"].__class__.objects.filter(username="mallory").exists()


def test_logins_are_throttled_after_repeated_failures(users):
    c = Client()
    for _ in range(5):
        r = c.post("/accounts/login/", {"username": "carol", "password": "wrong"})
        assert r.status_code == 200
    r = c.post("/accounts/login/", {"username": "carol", "password": "carol-password-1"})
    assert r.status_code == 429
    assert b"Too many failed logins" in r.content
    assert "_auth_user_id" not in c.session  # even the right password waits
    assert AuditEntry.objects.filter(action="login", outcome="failed", object_name="carol").count() == 5


def test_a_good_login_is_not_throttled(users):
    r = Client().post("/accounts/login/", {"username": "carol", "password": "carol-password-1"})
    assert r.status_code == 302


def test_error_pages_show_no_traceback(users):
    c = Client(raise_request_exception=False)
    c.force_login(users["carol"])
    r = c.get("/containers/nope/")
    assert r.status_code == 404
    assert b"Traceback" not in r.content
