"""Container requests are checked before anything reaches a host."""

import pytest
from django.test import Client

from containers.models import Container
from containers.services import allocate_ipv4, parse_command
from core.api import ApiError
from operations.models import Operation


@pytest.fixture
def lab_like_host(trusted_host):
    trusted_host.capabilities = {
        "templates": ["busybox"],
        "network": {"subnet": "10.9.9.0/24", "bridge": "lxcbr0", "range": [100, 102]},
    }
    trusted_host.save()
    return trusted_host


def _post(tokens, path, body, who="bob"):
    return Client().post(path, body, content_type="application/json", HTTP_AUTHORIZATION=f"Token {tokens[who]}")


def test_it_reserves_the_name_and_an_address_and_queues_a_create(tokens, lab_like_host):
    r = _post(tokens, "/api/v1/containers/", {"name": "c1", "host": "h1", "command": "sh -c 'sleep 1000'"})
    assert r.status_code == 202, r.content
    op = Operation.objects.get(pk=r.json()["id"])
    assert (op.kind, op.container_name, op.host.name) == ("create", "c1", "h1")
    assert op.params["command"] == ["sh", "-c", "sleep 1000"]
    c = Container.objects.get(name="c1")
    assert (c.state, c.ipv4) == ("CREATING", "10.9.9.100")


def test_addresses_are_unique_across_the_fleet_and_run_out_cleanly(tokens, lab_like_host):
    for name in ("a", "b", "c"):
        assert _post(tokens, "/api/v1/containers/", {"name": name, "host": "h1"}).status_code == 202
    assert sorted(Container.objects.values_list("ipv4", flat=True)) == ["10.9.9.100", "10.9.9.101", "10.9.9.102"]
    r = _post(tokens, "/api/v1/containers/", {"name": "d", "host": "h1"})
    assert r.status_code == 409 and "no free address" in r.json()["error"]
    assert not Container.objects.filter(name="d").exists()


@pytest.mark.parametrize(
    "body,status,field,words",
    [
        ({"name": "c;ls", "host": "h1"}, 400, "name", "lowercase"),
        ({"name": "c1", "host": "nowhere"}, 400, "host", "no host named nowhere"),
        ({"name": "c1", "host": "h1", "template": "centos"}, 400, "template", "no template 'centos'"),
        ({"name": "c1", "host": "h1", "command": 5}, 400, "command", "string or a list"),
        ({"name": "c1", "host": "h1", "command": "sh -c 'unterminated"}, 400, "command", "cannot be split"),
        ({"name": "c1", "host": "h1", "command": ["a\u0000b"]}, 400, "command", "NUL"),
    ],
)
def test_it_refuses_bad_create_requests(tokens, lab_like_host, body, status, field, words):
    r = _post(tokens, "/api/v1/containers/", body)
    assert r.status_code == status
    assert r.json()["field"] == field
    assert words in r.json()["error"]
    assert not Container.objects.exists() and not Operation.objects.exists()


def test_it_refuses_a_taken_name(tokens, lab_like_host):
    Container.objects.create(name="c1", host=lab_like_host, state="RUNNING")
    r = _post(tokens, "/api/v1/containers/", {"name": "c1", "host": "h1"})
    assert r.status_code == 409 and r.json()["field"] == "name"


@pytest.mark.parametrize("status", ["untrusted", "offline", "key-mismatch"])
def test_it_refuses_hosts_that_are_not_usable(tokens, lab_like_host, status):
    lab_like_host.status = status
    lab_like_host.save()
    r = _post(tokens, "/api/v1/containers/", {"name": "c1", "host": "h1"})
    assert r.status_code == 409
    assert not Container.objects.exists()


def test_a_second_operation_on_a_container_gets_409_with_the_running_one(tokens, lab_like_host):
    Container.objects.create(name="c1", host=lab_like_host, state="RUNNING")
    first = _post(tokens, "/api/v1/containers/c1/state", {"action": "stop"})
    assert first.status_code == 202
    second = _post(tokens, "/api/v1/containers/c1/state", {"action": "start"})
    assert second.status_code == 409
    assert first.json()["url"] in second.json()["error"]
    assert Operation.objects.count() == 1


def test_viewers_cannot_change_containers(tokens, lab_like_host):
    Container.objects.create(name="c1", host=lab_like_host, state="RUNNING")
    assert _post(tokens, "/api/v1/containers/c1/state", {"action": "stop"}, who="carol").status_code == 403
    assert Client().delete("/api/v1/containers/c1/", HTTP_AUTHORIZATION=f"Token {tokens['carol']}").status_code == 403
    assert _post(tokens, "/api/v1/containers/", {"name": "c2", "host": "h1"}, who="carol").status_code == 403
    assert not Operation.objects.exists()


def test_the_list_has_the_columns_of_lxc_list(tokens, lab_like_host):
    Container.objects.create(name="c1", host=lab_like_host, state="RUNNING", ipv4="10.9.9.100")
    rows = (
        Client().get("/api/v1/containers/?host=h1&state=running", HTTP_AUTHORIZATION=f"Token {tokens['carol']}").json()
    )
    assert [(r["name"], r["state"], r["ipv4"], r["type"], r["snapshots"], r["host"]) for r in rows] == [
        ("c1", "RUNNING", "10.9.9.100", "PERSISTENT", 0, "h1")
    ]
    assert "ipv6" in rows[0]


def test_parse_command_keeps_arguments_literal():
    assert parse_command("echo '$(reboot)' ; ls") == ["echo", "$(reboot)", ";", "ls"]
    assert parse_command(None) is None
    with pytest.raises(ApiError):
        parse_command(["x"] * 100)


def test_allocate_needs_a_network(trusted_host):
    assert allocate_ipv4(trusted_host) == (None, None)


def test_the_state_page_refuses_actions_that_are_not_states(users, lab_like_host):
    Container.objects.create(name="c1", host=lab_like_host, state="RUNNING")
    c = Client()
    c.force_login(users["bob"])
    for action in ("create", "delete", "migrate", "x" * 40):
        c.post("/containers/c1/state", {"action": action})
    assert not Operation.objects.exists()
    assert Container.objects.filter(name="c1").exists()


def test_cancelling_a_pending_create_releases_the_name_and_address(tokens, lab_like_host):
    r = _post(tokens, "/api/v1/containers/", {"name": "c1", "host": "h1"})
    op_id = r.json()["id"]
    assert _post(tokens, f"/api/v1/operations/{op_id}/cancel", {}).status_code == 202
    assert Operation.objects.get(pk=op_id).status == "cancelled"
    assert not Container.objects.filter(name="c1").exists()
    assert _post(tokens, "/api/v1/containers/", {"name": "c1", "host": "h1"}).status_code == 202


def test_page_actions_open_the_operation_or_go_back_saying_why(users, lab_like_host):
    Container.objects.create(name="c1", host=lab_like_host, state="RUNNING", ipv4="10.9.9.100")
    c = Client()
    c.force_login(users["bob"])
    r = c.post("/containers/c1/snapshot", {"stateful": "1"})
    assert r.status_code == 302 and r["Location"].startswith("/operations/")
    r = c.post("/containers/c1/state", {"action": "stop"})  # refused: the snapshot runs
    assert r["Location"] == "/containers/c1/"
    assert "already has an operation running" in c.get(r["Location"]).content.decode()
    r = c.post("/containers/c1/migrate", {"target_host": "nowhere"})
    assert r["Location"] == "/containers/c1/"
    r = c.post("/hosts/h1/probe")
    assert r.status_code == 302 and r["Location"].startswith("/operations/")
    assert Operation.objects.count() == 2


def test_the_list_pages_with_limit_and_offset(tokens, lab_like_host):
    for i in range(5):
        Container.objects.create(name=f"c{i}", host=lab_like_host, state="RUNNING")
    auth = {"HTTP_AUTHORIZATION": f"Token {tokens['carol']}"}
    page = Client().get("/api/v1/containers/?limit=2&offset=2", **auth).json()
    assert [r["name"] for r in page] == ["c2", "c3"]
    assert Client().get("/api/v1/containers/?limit=x", **auth).status_code == 400
