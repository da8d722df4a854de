"""The authorisation matrix: every URL Django resolves and every websocket route, against
anonymous, role-less (dave), viewer (carol), operator (bob) and admin (alice) users.

The routes come from Django's resolver, so a URL added without a row here fails
`test_every_route_is_in_the_matrix`. A refused request answers 401/redirect (anonymous) or
403 (a role too low), names nothing it guards, answers the same whether the object exists or
not, and changes nothing: every table's rows, the audit log, the job queue and the bundle
files are compared before and after.
"""

import asyncio
import json
import re

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Group
from django.contrib.sessions.models import Session
from django.core.cache import cache
from django.db import transaction
from django.test import Client
from django.urls import URLResolver, get_resolver

from core.models import ApiToken, hash_token
from core.roles import ROLES
from operations import events
from operations.models import Operation
from operations.routing import websocket_urlpatterns
from tests.support.authz import API, ARGS, ARGS_BY_ROUTE, MATRIX, MISSING, PAGES, QUERY, _url  # noqa: F401
from tests.support.helpers import db_state

USERS = ["anonymous", "dave", "carol", "bob", "alice"]  # no role, viewer, operator, admin
LEVEL = {"anonymous": -1, "dave": 0, "carol": 1, "bob": 2, "alice": 3}
NEEDS = {"public": -1, "login": 0, "viewer": 1, "operator": 2, "admin": 3}
METHODS = ["get", "post", "put", "patch", "delete"]

# Names that only the world below uses: a refused answer must contain none of them.
SECRETS = ["secrethost", "otherhost", "secretbox", "secretsnap", "127.0.0.77", "carol-script"]


# Django's admin site is for staff accounts (`manage.py ensure_admin` makes one); none of
# the role users is staff, so every admin URL sends them to the (throttled) login page.
ADMIN_PREFIX = "admin/"
WEBSOCKETS = {"ws/operations/<id:op_id>/": "viewer", "ws/events/": "viewer"}


def _walk(patterns, prefix=""):
    for p in patterns:
        if isinstance(p, URLResolver):
            yield from _walk(p.url_patterns, prefix + str(p.pattern))
        else:
            yield prefix + str(p.pattern)


def all_routes() -> list[str]:
    return list(_walk(get_resolver().url_patterns))


def test_every_route_is_in_the_matrix():
    routes = all_routes()
    ours = [r for r in routes if not r.startswith(ADMIN_PREFIX) or r in PAGES]
    assert sorted(set(ours) - set(PAGES) - set(API)) == [], "new URLs: add them to the matrix with their role"
    assert sorted((set(PAGES) | set(API)) - set(routes)) == [], "the matrix names URLs that are gone"
    ws = [str(p.pattern) for p in websocket_urlpatterns]
    assert sorted(ws) == sorted(WEBSOCKETS)


# --- the world every request is made against ------------------------------------------


@pytest.fixture(autouse=True)
def _no_login_throttle_between_tests():
    cache.clear()  # the matrix posts many failed logins; each test starts unthrottled
    yield
    cache.clear()


def _request(route, method, body, user, world, missing=False, api=None):
    api = route.startswith("api/v1/") if api is None else api
    path = _url(route, world, user, missing)
    c = Client(raise_request_exception=False)
    headers = {}
    if api and user != "anonymous":
        headers["HTTP_AUTHORIZATION"] = f"Token {world['tokens'][user]}"
    elif user != "anonymous":
        c.force_login(world["users"][user])
    if route == "api/schema/":
        headers["HTTP_ACCEPT"] = "application/json"
    if api and body is not None:
        return getattr(c, method)(path, json.dumps(body), content_type="application/json", **headers)
    if body is not None:
        return getattr(c, method)(path, body, **headers)
    return getattr(c, method)(path, **headers)


def files_state(world) -> list:
    return sorted(str(p) for p in world["bundles"].rglob("*"))


def assert_refused_and_unchanged(r, user, api, route, before, after, callbacks):
    if user == "anonymous":
        if api:
            assert r.status_code == 401, (route, r.status_code)
            assert r.json() == {"error": "Authentication credentials were not provided.", "field": None}
        else:
            assert r.status_code == 302, (route, r.status_code)
            assert r["Location"].startswith("/accounts/login/?next=")
    else:
        assert r.status_code == 403, (route, user, r.status_code)
        if api:
            assert r.json() == {"error": "Your role does not allow this.", "field": None}
    body = r.content.decode(errors="replace")
    for secret in SECRETS:
        assert secret not in body, (route, user, secret)
    assert after == before, (route, user, "a refused request changed the database")
    assert callbacks == [], (route, user, "a refused request queued a job")


def _without_csrf(content: bytes) -> bytes:
    """Pages carry a fresh CSRF token (the logout form); that is the only difference allowed."""
    return re.sub(rb'name="csrfmiddlewaretoken" value="[^"]*"', b"", content)


def _check(route, method, spec, user, world, capture):
    needs, body, ok = spec
    api = route in API
    before, files = db_state(), files_state(world)
    with capture() as callbacks:
        r = _request(route, method, body, user, world)
    if LEVEL[user] >= NEEDS[needs]:
        assert r.status_code == ok, (route, user, r.status_code, r.content[:300])
        if route == "admin/login/":
            assert r["Location"].startswith("/accounts/login/")
        return
    assert_refused_and_unchanged(r, user, api, route, before, db_state(), callbacks)
    assert files_state(world) == files
    # The same answer for an object that does not exist: refusals reveal no names.
    if "<" in route:
        r2 = _request(route, method, body, user, world, missing=True)
        assert r2.status_code == r.status_code, (route, user)
        if user != "anonymous" or api:
            assert _without_csrf(r2.content) == _without_csrf(r.content), (route, user)


@pytest.mark.parametrize("route,method,spec", MATRIX, ids=[f"{m.upper()} /{r}" for r, m, _ in MATRIX])
def test_the_matrix(route, method, spec, world, django_capture_on_commit_callbacks):
    """Each kind of user in turn, each against the same world: a permitted write is rolled back
    (with the jobs it queued) before the next user asks."""
    for user in USERS:
        cache.clear()
        with transaction.atomic():
            _check(route, method, spec, user, world, django_capture_on_commit_callbacks)
            transaction.set_rollback(True)


UNLISTED = {
    route: [m for m in METHODS if m not in methods]
    for table in (PAGES, API)
    for route, methods in table.items()
    if route != "admin/login/"
}


@pytest.mark.parametrize("route", sorted(UNLISTED), ids=[f"/{r}" for r in sorted(UNLISTED)])
def test_methods_outside_the_matrix_are_refused(route, world, django_capture_on_commit_callbacks):
    """Even for an admin, a method the matrix does not list answers 405 and changes nothing."""
    api = route in API
    before = db_state()
    for method in UNLISTED[route]:
        with django_capture_on_commit_callbacks() as callbacks:
            r = _request(route, method, {} if method != "get" else None, "alice", world, api=api)
        assert r.status_code == 405, (route, method, r.status_code)
        if api:
            assert r.json()["error"].endswith(".") and r.json()["field"] is None
        assert callbacks == [], (route, method)
    assert db_state() == before


def test_django_admin_is_for_staff_only(world):
    """Every URL of Django's admin site sends our non-staff users, admins included, to log in."""
    admin_routes = [r for r in all_routes() if r.startswith(ADMIN_PREFIX) and r not in PAGES]
    assert len(admin_routes) > 20
    before = db_state()
    fill = {"<path:object_id>": "1", "<id>": "1", "<path:content_type_id>": "1"}
    for route in admin_routes:
        path = "/" + route
        for tag, value in fill.items():
            path = path.replace(tag, value)
        path = re.sub(r"\^\(\?P<app_label>[\w|]+\)/\$", "hosts/", path).replace("(?P<url>.*)$", "x/")
        for user in ("anonymous", "dave", "alice"):  # the admin site asks only is_staff: alice is as high as it gets
            c = Client(raise_request_exception=False)
            if user != "anonymous":
                c.force_login(world["users"][user])
            for method in ("get", "post"):
                r = getattr(c, method)(path)
                assert r.status_code == 302, (path, user, method, r.status_code)
                assert r["Location"].startswith(("/admin/login/", "/accounts/login/", "/admin/")), (path, r["Location"])
    assert db_state() == before


def test_the_django_admin_login_goes_through_the_throttled_login(world):
    """/admin/login/ is not a second password form that skips throttling and auditing."""
    c = Client()
    r = c.get("/admin/login/?next=/admin/")
    assert r.status_code == 302 and r["Location"] == "/accounts/login/?next=/admin/"
    r = c.post("/admin/login/", {"username": "alice", "password": "wrong"})
    assert r.status_code == 302 and "_auth_user_id" not in c.session


# --- things a permitted user may do only to their own objects ---------------------------


def test_only_admins_revoke_other_peoples_tokens(world):
    carols = ApiToken.objects.filter(user=world["users"]["carol"]).order_by("pk").first()
    for user in ("dave", "bob"):
        c = Client()
        c.force_login(world["users"][user])
        r = c.post(f"/tokens/{carols.pk}/revoke")
        assert r.status_code == 404
        assert ApiToken.objects.filter(pk=carols.pk).exists()
    c = Client()
    c.force_login(world["users"]["alice"])
    assert c.post(f"/tokens/{carols.pk}/revoke").status_code == 302
    assert not ApiToken.objects.filter(pk=carols.pk).exists()


def test_the_token_page_lists_only_ones_own_tokens(world):
    c = Client()
    c.force_login(world["users"]["dave"])
    body = c.get("/tokens/").content.decode()
    assert "carol-script" not in body
    for t in ApiToken.objects.exclude(user=world["users"]["dave"]):
        assert t.prefix not in body


# --- websockets -----------------------------------------------------------------------


async def _ws_connect(path: str, headers: list):
    from ctweb.asgi import application

    comm = WebsocketCommunicator(application, path, headers=headers)
    connected, code = await comm.connect(timeout=5)
    first = await comm.receive_json_from(timeout=5) if connected else None
    return comm, connected, code, first


def _ws_headers(user: str, world) -> list:
    return [] if user == "anonymous" else [(b"authorization", f"Token {world['tokens'][user]}".encode())]


@pytest.fixture
def ws_world(transactional_db, request):
    """The world, committed: websocket consumers read it from their own threads."""
    for role in ROLES:  # a transactional test starts from empty tables, without the migration's groups
        Group.objects.get_or_create(name=role)
    return request.getfixturevalue("world")


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("route", sorted(WEBSOCKETS))
def test_the_websocket_matrix(route, user, ws_world):
    world = ws_world

    async def run():
        out = []
        for op in (world["pending_op"], 999999):
            comm, connected, code, first = await _ws_connect(
                "/" + route.replace("<id:op_id>", str(op)), _ws_headers(user, world)
            )
            out.append((connected, code, first))
            await comm.disconnect()
        return out

    (ok, code, first), (ok_missing, code_missing, _) = asyncio.run(run())
    if LEVEL[user] >= NEEDS[WEBSOCKETS[route]]:
        assert ok and first["type"] == "state"
        if "op_id" in route:
            assert not ok_missing and code_missing == 4404
    else:
        # Refused before anything is looked up: the same close for an operation that exists or not.
        assert not ok and code == 4403
        assert not ok_missing and code_missing == 4403


# --- a socket outlives nothing that allowed it ------------------------------------------


async def _recv_close(comm) -> int:
    while True:
        out = await comm.receive_output(timeout=5)
        if out["type"] == "websocket.close":
            return out.get("code")


def _publish(op_id: int) -> None:
    events.publish_operation(Operation.objects.select_related("host", "target_host").get(pk=op_id))


def _connect_pair(world, path, headers):
    """The user's socket, and a control socket of another viewer that must keep receiving."""

    async def run():
        mine = await _ws_connect(path, headers)
        control = await _ws_connect(path, _ws_headers("bob", world))
        assert mine[1] and control[1]
        return mine[0], control[0]

    return run


def _session_cookie(user) -> list:
    c = Client()
    c.force_login(user)
    return c, [(b"cookie", f"sessionid={c.cookies['sessionid'].value}".encode())]


# Each change that ends or alters access, for a socket opened with a token and with a session.
ACCESS_CHANGES = [
    (change, cred)
    for change in ("role removed", "role changed", "deactivated", "password reset", "token revoked", "logged out")
    for cred in ("token", "session")
    if (change, cred) not in {("token revoked", "session"), ("logged out", "token")}
]


@pytest.mark.parametrize("change,cred", ACCESS_CHANGES, ids=[f"{c} ({k})" for c, k in ACCESS_CHANGES])
@pytest.mark.parametrize("route", sorted(WEBSOCKETS))
def test_a_socket_closes_when_its_access_ends(route, change, cred, ws_world):
    """Also when what changed would still open a socket (viewer to operator, a new password
    for a token socket): it closes, and the script reconnects under the access it has now."""
    world = ws_world
    carol = world["users"]["carol"]
    path = "/" + route.replace("<id:op_id>", str(world["pending_op"]))
    session_client = None
    if cred == "session":
        session_client, headers = _session_cookie(carol)
    else:
        headers = _ws_headers("carol", world)

    def end_access():
        if change == "role removed":
            admin = Client()
            admin.force_login(world["users"]["alice"])
            admin.post(f"/users/{carol.pk}/update", {"action": "role", "role": ""})
        elif change == "role changed":
            admin = Client()
            admin.force_login(world["users"]["alice"])
            admin.post(f"/users/{carol.pk}/update", {"action": "role", "role": "operator"})
        elif change == "deactivated":
            admin = Client()
            admin.force_login(world["users"]["alice"])
            admin.post(f"/users/{carol.pk}/update", {"action": "deactivate"})
        elif change == "token revoked":
            token = ApiToken.objects.get(digest=hash_token(world["tokens"]["carol"]))
            own = Client()
            own.force_login(carol)
            assert own.post(f"/tokens/{token.pk}/revoke").status_code == 302
        elif change == "logged out":
            assert session_client.post("/accounts/logout/").status_code == 302
        elif change == "password reset":
            admin = Client()
            admin.force_login(world["users"]["alice"])
            admin.post(f"/users/{carol.pk}/update", {"action": "password", "password": "another-passphrase-7"})

    async def run():
        mine, control = await _connect_pair(world, path, headers)()
        await sync_to_async(end_access)()
        code = await _recv_close(mine)
        await sync_to_async(_publish)(world["pending_op"])
        seen = await control.receive_json_from(timeout=5)  # the event was sent...
        nothing = await mine.receive_nothing(timeout=0.3)  # ...and did not reach the closed socket
        await mine.disconnect()
        await control.disconnect()
        return code, seen, nothing

    code, seen, nothing = asyncio.run(run())
    assert code == 4403
    assert seen["type"] == "operation" and seen["operation"]["id"] == world["pending_op"]
    assert nothing


def test_a_socket_stays_open_for_an_unrelated_change(ws_world):
    """The re-check is not a blanket disconnect: another user's token going leaves carol's socket open."""
    world = ws_world

    async def run():
        mine, control = await _connect_pair(world, "/ws/events/", _ws_headers("carol", world))()
        await sync_to_async(ApiToken.objects.filter(user=world["users"]["dave"]).delete)()
        await sync_to_async(_publish)(world["pending_op"])
        got = await mine.receive_json_from(timeout=5)
        await mine.disconnect()
        await control.disconnect()
        return got

    assert asyncio.run(run())["type"] == "operation"


def test_a_session_that_ends_silently_closes_its_socket_at_the_next_message(ws_world, monkeypatch):
    """Sessions expire (or `clearsessions` deletes them) without any signal: a socket looks
    again before sending once RECHECK_S has passed (0 here), and closes instead of sending."""
    import operations.consumers

    monkeypatch.setattr(operations.consumers, "RECHECK_S", 0)
    world = ws_world
    _, headers = _session_cookie(world["users"]["carol"])

    async def run():
        mine, control = await _connect_pair(world, "/ws/events/", headers)()
        await sync_to_async(Session.objects.all().delete)()
        await sync_to_async(_publish)(world["pending_op"])
        code = await _recv_close(mine)
        seen = await control.receive_json_from(timeout=5)
        await mine.disconnect()
        await control.disconnect()
        return code, seen

    code, seen = asyncio.run(run())
    assert code == 4403 and seen["type"] == "operation"
