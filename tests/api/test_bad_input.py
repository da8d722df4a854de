"""Bad input gets a clear error and changes nothing."""

import json

import pytest
from django.test import Client

from core.models import AuditEntry
from hosts.models import Host
from tests.support.helpers import db_state


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
    for path, said in (
        ("/api/v1/hosts/nope/", "There is no host named 'nope'."),
        ("/api/v1/operations/999/", "There is no operation 999."),
        ("/api/v1/containers/c9/", "There is no container named 'c9'."),
        ("/api/v1/nothing/", "Not found."),
    ):
        r = Client().get(path, **admin)
        assert r.status_code == 404
        assert r.json() == {"error": said, "field": None}  # it names what it looked for


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


# --- every write endpoint: names, paths, unicode and wrong types ---------------------------
#
# Each answer is 400 with a sentence in {"error", "field"}; the database is unchanged and no
# job was queued (nothing can reach a host without one).

# Names that must never become a container, snapshot or host name (and so never reach a shell,
# a path or an lxc argument on a host).
BAD_NAMES = [
    "a;reboot", "$(reboot)", "`id`", "a|b", "a&&b", "a>b", "a b", "-rf", "--help",
    "..", ".", "../etc", "../../root/.ssh", "a/b", "a\\b", "~root", "*", "a?",
    "a\x00b", "\x00", "a\nb", "a\tb", "\u202ebox", "box\u200f", "\U0001f600", "ünï", "box\u0301",
    "UPPER", "", " box", "x" * 64, "x" * 100_000,
]  # fmt: skip
WRONG_TYPES = [None, 0, 5, 1.5, True, "true", "22", [], ["box"], {}, {"name": "box"}]


@pytest.fixture
def box(trusted_host):
    from containers.models import Container, Snapshot

    trusted_host.capabilities = {
        "templates": ["busybox"],
        "arch": "x86_64",
        "network": {"subnet": "10.9.9.0/24", "range": [100, 120]},
    }
    trusted_host.save()
    Host.objects.create(
        name="h2", address="127.0.0.1", port=1, status=Host.Status.ONLINE, capabilities=trusted_host.capabilities,
        key_type=trusted_host.key_type, key_data=trusted_host.key_data, fingerprint="SHA256:y",
    )  # fmt: skip
    c = Container.objects.create(name="box", host=trusted_host, state="RUNNING", ipv4="10.9.9.100")
    Snapshot.objects.create(container=c, name="s1", stateful=False)
    return c


def _refused(r, field, status=400, what=None):
    assert r.status_code == status, (what, r.status_code, r.content[:300])
    body = r.json()
    assert set(body) == {"error", "field"}
    assert body["field"] == field, (what, body)
    assert isinstance(body["error"], str) and len(body["error"]) > 10 and body["error"].endswith("."), body
    assert len(body["error"]) < 600  # a sentence, not an echo of a huge input


def _post_json(tokens, path, body, who="alice"):
    return Client(raise_request_exception=False).post(
        path, json.dumps(body), content_type="application/json", HTTP_AUTHORIZATION=f"Token {tokens[who]}"
    )


WRITES = [
    ("/api/v1/containers/", "name", lambda v: {"name": v, "host": "h1"}),
    ("/api/v1/containers/", "host", lambda v: {"name": "fresh", "host": v}),
    ("/api/v1/containers/", "template", lambda v: {"name": "fresh", "host": "h1", "template": v}),
    ("/api/v1/containers/box/snapshots/", "name", lambda v: {"name": v, "stateful": False}),
    ("/api/v1/containers/box/migrate", "target_host", lambda v: {"target_host": v}),
    ("/api/v1/hosts/", "name", lambda v: {"name": v, "address": "127.0.0.1", "port": 1}),
]


@pytest.mark.parametrize("path,field,make", WRITES, ids=[f"{p} {f}" for p, f, _ in WRITES])
def test_bad_names_are_refused_everywhere(path, field, make, tokens, box, django_capture_on_commit_callbacks):
    before = db_state()
    for value in BAD_NAMES:
        with django_capture_on_commit_callbacks() as queued:
            r = _post_json(tokens, path, make(value))
        _refused(r, field, what=value)
        assert queued == [], value
    assert db_state() == before


TYPED = [
    ("/api/v1/containers/", "name", lambda v: {"name": v, "host": "h1"}),
    ("/api/v1/containers/", "host", lambda v: {"name": "fresh", "host": v}),
    ("/api/v1/containers/", "template", lambda v: {"name": "fresh", "host": "h1", "template": v}),
    ("/api/v1/containers/box/snapshots/", "stateful", lambda v: {"stateful": v}),
    ("/api/v1/containers/box/state", "action", lambda v: {"action": v}),
    ("/api/v1/containers/box/state", "discard_state", lambda v: {"action": "start", "discard_state": v}),
    ("/api/v1/containers/box/migrate", "strategy", lambda v: {"target_host": "h2", "strategy": v}),
    ("/api/v1/hosts/h1/trust", "fingerprint", lambda v: {"fingerprint": v}),
    ("/api/v1/hosts/", "port", lambda v: {"name": "fresh", "address": "127.0.0.1", "port": v}),
]
# Right for these fields (a string is a fingerprint's type: "true" is then refused as the wrong
# key, or here as an unreachable host, which is not about types).
VALID = [("stateful", True), ("discard_state", True), ("port", 5), ("name", "true")]
VALID += [("fingerprint", "true"), ("fingerprint", "22")]
TYPED_CASES = [
    (path, field, make, value)
    for path, field, make in TYPED
    for value in WRONG_TYPES
    if not any(f == field and type(v) is type(value) and v == value for f, v in VALID)
]


@pytest.mark.parametrize("path,field,make,value", TYPED_CASES, ids=[f"{p} {f}={v!r}" for p, f, _, v in TYPED_CASES])
def test_wrong_json_types_are_refused(path, field, make, value, tokens, box, django_capture_on_commit_callbacks):
    """Each field takes its own JSON type only: not 5 for a name, 0 or "true" for a boolean."""
    before = db_state()
    with django_capture_on_commit_callbacks() as queued:
        r = _post_json(tokens, path, make(value))
    assert db_state() == before and queued == []
    _refused(r, field)


@pytest.mark.parametrize(
    "command",
    ["sh -c 'unterminated", ["a\x00"], {"sh": "-c"}, [["nested"]], [1, 2], 5, ["x"] * 65, ["x" * 5000], "a\x00b"],
    ids=repr,
)
def test_bad_commands_are_refused(command, tokens, box, django_capture_on_commit_callbacks):
    before = db_state()
    with django_capture_on_commit_callbacks() as queued:
        r = _post_json(tokens, "/api/v1/containers/", {"name": "fresh", "host": "h1", "command": command})
    _refused(r, "command")
    assert db_state() == before and queued == []


def test_a_command_with_shell_metacharacters_is_kept_as_text(tokens, box):
    """Accepted, but as an argument list: `;`, `$(...)` and backticks are never given to a shell."""
    from operations.models import Operation

    r = _post_json(tokens, "/api/v1/containers/", {"name": "fresh", "host": "h1", "command": "echo $(reboot); `id`"})
    assert r.status_code == 202
    assert Operation.objects.get(pk=r.json()["id"]).params["command"] == ["echo", "$(reboot);", "`id`"]


# --- names in URLs ------------------------------------------------------------------------

PATH_NAMES = [
    "..", "%2e%2e", ".%2e", "..%2F..%2Fetc%2Fpasswd", "%2F", "..%5C..%5Cetc", "a;reboot", "%24(reboot)",
    "%60id%60", "%E2%80%AEbox", "%F0%9F%98%80", "box%CC%81", "%FF%FE", "x" * 300,
]  # fmt: skip
URL_TEMPLATES = [
    ("get", "/api/v1/containers/{}/"),
    ("delete", "/api/v1/containers/{}/"),
    ("post", "/api/v1/containers/{}/state"),
    ("get", "/api/v1/containers/box/snapshots/{}/"),
    ("delete", "/api/v1/containers/box/snapshots/{}/"),
    ("post", "/api/v1/containers/box/snapshots/{}/restore"),
    ("get", "/api/v1/containers/box/snapshots/compare?a={}&b=s1"),
    ("get", "/api/v1/operations/{}/bundle"),
    ("post", "/api/v1/operations/{}/cancel"),
    ("delete", "/api/v1/hosts/{}/"),
    ("post", "/api/v1/hosts/{}/probe"),
]


def _a_404(body: dict) -> bool:
    """The API's 404: a sentence naming what was not found (or plain "Not found." for a URL it has not)."""
    said = body.get("error") or ""
    return body.get("field") is None and (said == "Not found." or said.startswith(("There is no ", "Container ")))


@pytest.mark.parametrize("method,template", URL_TEMPLATES, ids=[f"{m} {t}" for m, t in URL_TEMPLATES])
def test_names_in_urls_find_nothing(method, template, tokens, box, django_capture_on_commit_callbacks):
    """Traversal, shell and odd unicode in a URL name nothing: a 404 in the API's format."""
    before = db_state()
    kwargs = {"content_type": "application/json", "data": json.dumps({"action": "start"})} if method == "post" else {}
    for name in PATH_NAMES:
        with django_capture_on_commit_callbacks() as queued:
            r = getattr(Client(raise_request_exception=False), method)(
                template.format(name), HTTP_AUTHORIZATION=f"Token {tokens['alice']}", **kwargs
            )
        assert r.status_code == 404, (name, r.status_code, r.content[:200])
        assert _a_404(r.json()), (name, r.json())
        assert queued == [], name
    assert db_state() == before


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/hosts/a%00b/",
        "/api/v1/containers/box%00/",
        "/api/v1/containers/box/snapshots/s1%00/restore",
        "/api/v1/operations/?container=a%00b",
        "/api/v1/containers/?host=%00",
        "/api/v1/snapshots/?q=%00",
        "/api/v1/snapshots/?since=2026-01-01%00",
        "/api/v1/containers/box/snapshots/compare?a=s1&b=%00",
    ],
)
def test_a_nul_in_a_url_is_refused(url, tokens, box):
    """No name holds a NUL, and PostgreSQL refuses one in a query (that was a 500 there)."""
    r = Client(raise_request_exception=False).get(url, HTTP_AUTHORIZATION=f"Token {tokens['alice']}")
    _refused(r, None)
    assert "NUL" in r.json()["error"]


QUERIES = [
    "limit=abc", "offset=abc", "limit=1e9", "limit=" + "9" * 5000, "offset=99999999999999999999999999",
    "limit=-5&offset=-5", "status=%E2%80%AE", "since=9999-99-99", "until=2026-02-30", "stateful=maybe",
    "kind=%F0%9F%98%80", "created_by=%27%3B%20DROP%20TABLE", "container=..%2F..", "host=%FF",
]  # fmt: skip


@pytest.mark.parametrize(
    "path", ["/api/v1/operations/", "/api/v1/containers/", "/api/v1/snapshots/", "/api/v1/containers/box/snapshots/"]
)
def test_query_parameters_never_fail_the_server(path, tokens, box):
    for query in QUERIES:
        r = Client(raise_request_exception=False).get(f"{path}?{query}", HTTP_AUTHORIZATION=f"Token {tokens['carol']}")
        assert r.status_code in (200, 400), (query, r.status_code, r.content[:200])
        if r.status_code == 400:
            _refused(r, r.json()["field"], what=query)
        else:
            assert isinstance(r.json(), list), query


@pytest.mark.parametrize("op_id", ["99999999999999999999999", "1" * 19, "-1", "0x10", "1.0"])
def test_operation_ids_too_long_for_the_database_find_nothing(op_id, tokens, box):
    for path in (f"/api/v1/operations/{op_id}/", f"/api/v1/operations/{op_id}/bundle"):
        r = Client(raise_request_exception=False).get(path, HTTP_AUTHORIZATION=f"Token {tokens['carol']}")
        assert r.status_code == 404 and _a_404(r.json()), r.json()


def test_unknown_api_urls_answer_in_json(tokens):
    for path in ("/api/v1/nope", "/api/v1/containers/a/b/c/d/e/", "/api/v2/"):
        r = Client().get(path, HTTP_AUTHORIZATION=f"Token {tokens['carol']}")
        assert r.status_code == 404 and r.json() == {"error": "Not found.", "field": None}


# --- bodies: size, depth, shape, encoding -------------------------------------------------


@pytest.mark.parametrize(
    "body,status,words",
    [
        ("[" * 100_000 + "]" * 100_000, 400, "nested too deeply"),
        ('{"name": ' * 5000 + "1" + "}" * 5000, 400, "nested too deeply"),
        ("[1, 2]", 400, "Expected a dictionary"),
        ('"box"', 400, "Expected a dictionary"),
        ("null", 400, "No data provided"),
        ("{nope", 400, "not valid JSON"),
        ('{"name": NaN}', 400, "not valid JSON"),
        (b"\xff\xfe{}", 400, "not valid JSON"),
        ('{"name": "\\ud800"}', 400, "lowercase"),
    ],
    ids=["deep list", "deep object", "a list", "a string", "null", "broken", "NaN", "not utf-8", "lone surrogate"],
)
def test_malformed_bodies_get_a_sentence(body, status, words, tokens, box, django_capture_on_commit_callbacks):
    before = db_state()
    with django_capture_on_commit_callbacks() as queued:
        r = Client(raise_request_exception=False).post(
            "/api/v1/containers/", body, content_type="application/json", HTTP_AUTHORIZATION=f"Token {tokens['bob']}"
        )
    assert r.status_code == status, (r.status_code, r.content[:200])
    assert words in r.json()["error"] and r.json()["error"].endswith(".")
    assert db_state() == before and queued == []


@pytest.mark.parametrize(
    "path", ["/api/v1/containers/", "/api/v1/hosts/", "/api/v1/containers/box/snapshots/", "/api/v1/hosts/h1/trust"]
)
def test_a_multi_megabyte_body_is_refused_unread(path, tokens, box, django_capture_on_commit_callbacks):
    big = json.dumps({"name": "fresh", "host": "h1", "command": ["x" * 1000] * 3000})  # ~3 MB
    before = db_state()
    with django_capture_on_commit_callbacks() as queued:
        r = Client(raise_request_exception=False).post(
            path, big, content_type="application/json", HTTP_AUTHORIZATION=f"Token {tokens['alice']}"
        )
    _refused(r, None, status=413)
    assert "larger than 256 KiB" in r.json()["error"]
    assert db_state() == before and queued == []


def test_a_body_just_under_the_limit_is_read(tokens, box):
    """The limit is on size only: a large but acceptable body gets its ordinary answer."""
    body = json.dumps({"name": "fresh", "host": "h1", "padding": "x" * 200_000})
    r = Client().post(
        "/api/v1/containers/", body, content_type="application/json", HTTP_AUTHORIZATION=f"Token {tokens['bob']}"
    )
    assert r.status_code == 202


def test_a_form_too_large_is_refused(users):
    c = Client(raise_request_exception=False)
    c.force_login(users["alice"])
    r = c.post("/tokens/create", {"name": "x" * 300_000})
    assert r.status_code == 413 and "larger than 256 KiB" in r.content.decode()
    assert not users["alice"].api_tokens.exists()


# --- forms ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "who,path,form",
    [
        ("alice", "/tokens/create", {"name": "a\x00b"}),
        ("alice", "/users/create", {"username": "mal\x00", "password": "a-long-passphrase-9"}),
        ("alice", "/users/create", {"username": "mallory", "password": "a-long-pass\x00phrase-9"}),
        ("alice", "/hosts/add/", {"name": "ok", "address": "127.0.0.1\x00", "port": "1", "username": "root"}),
        ("alice", "/hosts/h1/trust", {"fingerprint": "SHA256:\x00"}),
        ("bob", "/containers/new/", {"name": "fresh", "host": "h1\x00", "template": "busybox"}),
        ("bob", "/containers/box/snapshot", {"name": "s\x00"}),
        ("bob", "/containers/box/migrate", {"target_host": "h2\x00", "strategy": "auto"}),
        ("bob", "/containers/box/state", {"action": "st\x00op"}),
        ("bob", "/containers/box/delete", {"confirm": "box\x00"}),
        (None, "/accounts/login/", {"username": "carol\x00", "password": "carol-password-1"}),
    ],
)
def test_a_nul_in_a_form_is_refused_and_saves_nothing(who, path, form, users, box, django_capture_on_commit_callbacks):
    c = Client(raise_request_exception=False)
    if who:
        c.force_login(users[who])
    before = db_state()
    with django_capture_on_commit_callbacks() as queued:
        r = c.post(path, form)
    assert r.status_code == 400, (r.status_code, r.content[:200])
    assert r.content.decode() == "Form fields may not contain NUL characters."
    assert db_state() == before and queued == []


def test_token_names_keep_only_printable_characters(users):
    c = Client()
    c.force_login(users["dave"])
    c.post("/tokens/create", {"name": "backup\u202e\u200b\tjob"})
    assert users["dave"].api_tokens.get().name == "backupjob"


def test_a_failed_login_with_an_odd_user_name_is_audited_as_text(users):
    r = Client().post("/accounts/login/", {"username": "\u202e\U0001f600 a b", "password": "x"})
    assert r.status_code == 200
    assert AuditEntry.objects.get(action="login").object_name == "\u202e\U0001f600 a b"
