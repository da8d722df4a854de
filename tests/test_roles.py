"""Every page and endpoint against every kind of user, per API.md's roles."""

import pytest
from django.test import Client

from containers.models import Operation

USERS = ["anonymous", "dave", "carol", "bob", "alice"]  # no role, viewer, operator, admin
LEVEL = {"anonymous": -1, "dave": 0, "carol": 1, "bob": 2, "alice": 3}
NEEDS = {"login": 0, "viewer": 1, "operator": 2, "admin": 3}

PAGES = [
    ("/", "viewer"),
    ("/hosts/", "viewer"),
    ("/hosts/h1/", "viewer"),
    ("/hosts/add/", "admin"),
    ("/operations/", "viewer"),
    ("/operations/{op}/", "viewer"),
    ("/users/", "admin"),
    ("/audit/", "admin"),
    ("/containers/", "viewer"),
    ("/snapshots/", "viewer"),
    ("/tokens/", "login"),
]

# (method, path, body, role needed, the status a permitted user gets)
API = [
    ("get", "/api/v1/hosts/", None, "viewer", 200),
    ("get", "/api/v1/hosts/h1/", None, "viewer", 200),
    ("get", "/api/v1/ssh-key/", None, "viewer", 200),
    ("get", "/api/v1/operations/", None, "viewer", 200),
    ("get", "/api/v1/operations/{op}/", None, "viewer", 200),
    ("post", "/api/v1/hosts/", {}, "admin", 400),  # allowed in, then refused for the empty body
    ("post", "/api/v1/hosts/h1/trust", {"fingerprint": "SHA256:x"}, "admin", 400),  # port 1: unreachable
    ("post", "/api/v1/hosts/h1/probe", None, "operator", 202),
    ("post", "/api/v1/operations/{op}/cancel", None, "operator", 202),
    ("delete", "/api/v1/hosts/h1/", None, "admin", 409),  # the probe above is still pending
]


@pytest.fixture
def op(trusted_host, users):
    return Operation.objects.create(kind="probe", host=trusted_host, created_by=users["alice"])


def _client(name, users):
    c = Client()
    if name != "anonymous":
        c.force_login(users[name])
    return c


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("path,needs", PAGES)
def test_it_serves_pages_by_role(user, path, needs, users, op):
    r = _client(user, users).get(path.format(op=op.pk))
    if user == "anonymous":
        assert r.status_code == 302 and r["Location"].startswith("/accounts/login/")
    elif LEVEL[user] >= NEEDS[needs]:
        assert r.status_code == 200
    else:
        assert r.status_code == 403


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("method,path,body,needs,ok", API)
def test_it_serves_the_api_by_role(user, method, path, body, needs, ok, users, tokens, op):
    headers = {} if user == "anonymous" else {"HTTP_AUTHORIZATION": f"Token {tokens[user]}"}
    kwargs = {"content_type": "application/json"} if body is not None else {}
    r = (
        getattr(Client(), method)(path.format(op=op.pk), body, **kwargs, **headers)
        if body is not None
        else getattr(Client(), method)(path.format(op=op.pk), **headers)
    )
    if user == "anonymous":
        assert r.status_code == 401
        assert r.json()["error"]
    elif LEVEL[user] >= NEEDS[needs]:
        assert r.status_code == ok, r.content
    else:
        assert r.status_code == 403
        assert r.json() == {"error": "Your role does not allow this.", "field": None}


def test_it_answers_401_to_a_wrong_token(db):
    r = Client().get("/api/v1/hosts/", HTTP_AUTHORIZATION="Token nope")
    assert r.status_code == 401
    assert "not valid" in r.json()["error"]


def test_a_deactivated_users_token_stops_working(users, tokens):
    users["carol"].is_active = False
    users["carol"].save()
    assert Client().get("/api/v1/hosts/", HTTP_AUTHORIZATION=f"Token {tokens['carol']}").status_code == 401


def test_session_api_calls_need_csrf(users, trusted_host):
    c = Client(enforce_csrf_checks=True)
    c.force_login(users["bob"])
    r = c.post("/api/v1/hosts/h1/probe")
    assert r.status_code == 403
    assert "CSRF" in r.json()["error"]
    assert not Operation.objects.exists()


def test_the_schema_is_public_and_lists_the_api(db):
    r = Client().get("/api/schema/", HTTP_ACCEPT="application/json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert "/api/v1/hosts/{name}/trust" in paths and "/api/v1/operations/{op_id}/cancel" in paths
