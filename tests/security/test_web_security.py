"""Headers, cookies, CSRF and login throttling: what the browser side promises."""

import pytest
from django.core.cache import cache
from django.test import Client
from django.urls import path

from core.models import AuditEntry


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


def _boom(request):
    raise RuntimeError("secret internals: /var/lib/ctweb and a stack")


urlpatterns = [path("boom/", _boom)]


@pytest.mark.urls("tests.security.test_web_security")
def test_an_unexpected_error_shows_the_dashboards_page_not_a_traceback(settings, db):
    settings.DEBUG = False
    r = Client(raise_request_exception=False).get("/boom/")
    assert r.status_code == 500
    assert b"Something went wrong" in r.content
    assert b"secret internals" not in r.content and b"Traceback" not in r.content
    assert b"/static/css/" in r.content  # styled like every other page


def test_pages_that_do_not_exist_and_roles_that_do_not_allow_say_so_in_words(users):
    c = Client()
    c.force_login(users["carol"])
    r = c.get("/no-such-page/")
    assert r.status_code == 404 and b"Not found" in r.content and b'aria-label="Main"' in r.content
    c.force_login(users["dave"])
    r = c.get("/containers/")
    assert r.status_code == 403 and b"Your account has no role yet" in r.content
    c.force_login(users["carol"])
    r = c.get("/users/")
    assert r.status_code == 403 and b"This page needs the admin role." in r.content


def test_a_form_without_its_csrf_token_gets_a_page_that_explains(users):
    c = Client(enforce_csrf_checks=True)
    c.force_login(users["alice"])
    r = c.post("/tokens/create", {"name": "x"})
    assert r.status_code == 403 and b"This form could not be accepted" in r.content
