"""Bad input gets a clear error and changes nothing."""

import pytest
from django.test import Client

from ctweb.models import AuditEntry
from hosts.models import Host


@pytest.fixture
def admin(tokens):
    return {"HTTP_AUTHORIZATION": f"Token {tokens['alice']}"}


@pytest.mark.parametrize(
    "body,field",
    [
        ({"name": "a;rm -rf /", "address": "127.0.0.1"}, "name"),
        ({"name": "$(reboot)", "address": "127.0.0.1"}, "name"),
        ({"name": "../etc", "address": "127.0.0.1"}, "name"),
        ({"name": "UPPER", "address": "127.0.0.1"}, "name"),
        ({"name": "ok", "address": "127.0.0.1; reboot"}, "address"),
        ({"name": "ok", "address": "`id`"}, "address"),
        ({"name": "ok", "address": "host/../../x"}, "address"),
        ({"name": "ok", "address": "127.0.0.1", "port": "abc"}, "port"),
        ({"name": "ok", "address": "127.0.0.1", "port": 70000}, "port"),
        ({"name": "ok", "address": "127.0.0.1", "username": "root -oProxyCommand=x"}, "username"),
        ({"name": "ünïcode", "address": "127.0.0.1"}, "name"),
        ({"name": "trailing\n", "address": "127.0.0.1"}, "name"),
        ({"name": "ok", "address": "127.0.0.1\n"}, "address"),
        ({"name": ["list"], "address": "127.0.0.1"}, "name"),
        ({"name": "x" * 100, "address": "127.0.0.1"}, "name"),
        ({"address": "127.0.0.1"}, "name"),
    ],
)
def test_it_refuses_bad_host_input(admin, body, field):
    r = Client().post("/api/v1/hosts/", body, content_type="application/json", **admin)
    assert r.status_code == 400
    assert r.json()["field"] == field
    assert r.json()["error"].endswith(".")
    assert not Host.objects.exists()


def test_it_refuses_a_body_that_is_not_json(admin):
    r = Client().post("/api/v1/hosts/", "{nope", content_type="application/json", **admin)
    assert r.status_code == 400
    assert r.json() == {"error": "The request body is not valid JSON.", "field": None}


def test_it_refuses_a_taken_name(admin, trusted_host):
    r = Client().post(
        "/api/v1/hosts/", {"name": "h1", "address": "127.0.0.1"}, content_type="application/json", **admin
    )
    assert r.status_code == 409
    assert r.json()["field"] == "name"


def test_it_answers_404_in_json_for_unknown_things(admin):
    for path in ("/api/v1/hosts/nope/", "/api/v1/operations/999/"):
        r = Client().get(path, **admin)
        assert r.status_code == 404
        assert r.json() == {"error": "Not found.", "field": None}


def test_the_host_form_shows_the_error_and_saves_nothing(users):
    c = Client()
    c.force_login(users["alice"])
    r = c.post("/hosts/add/", {"name": "x;y", "address": "127.0.0.1", "port": "22", "username": "root"})
    assert r.status_code == 200
    assert b"Names start with a lowercase letter" in r.content
    assert not Host.objects.exists()


def test_an_unreachable_host_is_audited_as_failed(admin):
    r = Client().post(
        "/api/v1/hosts/", {"name": "gone", "address": "127.0.0.1", "port": 1}, content_type="application/json", **admin
    )
    assert r.status_code == 400
    assert "Cannot reach 127.0.0.1 port 1" in r.json()["error"]
    entry = AuditEntry.objects.get()
    assert (entry.username, entry.action, entry.outcome) == ("alice", "host.add", "failed")
    assert not Host.objects.exists()
