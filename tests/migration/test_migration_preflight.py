"""Which strategies two hosts allow, and why not (pure logic over probed capabilities)."""

import pytest
from django.test import Client

from containers.migration import choose_strategy, strategy_support
from containers.models import Container
from core.api import ApiError
from hosts.models import Host
from operations.models import Operation

NET = {"subnet": "10.9.9.0/24", "bridge": "lxcbr0", "range": [100, 200]}
CAPS = {
    "arch": "x86_64",
    "criu_check": "ok",
    "criu_version": "4.1.1",
    "uffd": True,
    "page_relay": 1,
    "dirty_tracking": False,
    "network": NET,
    "templates": ["busybox"],
}


def _host(name, **caps):
    return Host.objects.create(
        name=name,
        address="127.0.0.1",
        port=1,
        status="online",
        key_type="ssh-ed25519",
        key_data="AAAA",
        capabilities={**CAPS, **caps},
    )


@pytest.fixture
def pair(db):
    a, b = _host("a"), _host("b")
    c = Container.objects.create(name="c1", host=a, state="RUNNING", ipv4="10.9.9.100")
    return c, a, b


def test_stop_and_copy_and_restart_are_possible_between_equal_hosts(pair):
    c, a, b = pair
    s = strategy_support(c, a, b)
    assert s["stop-and-copy"] is None and s["restart"] is None
    assert s["post-copy"] is None  # both have userfaultfd
    assert "dirty memory" in s["pre-copy"]


def test_auto_prefers_post_copy_where_both_hosts_have_uffd(pair):
    c, a, b = pair
    strategy, why = choose_strategy(c, a, b, "auto")
    assert strategy == "post-copy" and "auto" in why


@pytest.mark.parametrize("which", ["source", "target"])
def test_without_uffd_on_either_host_post_copy_is_refused_and_auto_stops_and_copies(pair, which):
    c, a, b = pair
    (a if which == "source" else b).capabilities = {**CAPS, "uffd": False}
    assert "userfaultfd" in strategy_support(c, a, b)["post-copy"]
    with pytest.raises(ApiError) as e:
        choose_strategy(c, a, b, "post-copy")
    assert "userfaultfd" in str(e.value.detail)
    strategy, why = choose_strategy(c, a, b, "auto")
    assert strategy == "stop-and-copy" and "auto" in why


@pytest.mark.parametrize("which", ["source", "target"])
def test_auto_picks_post_copy_only_where_both_agents_have_the_resumable_page_relay(pair, which):
    c, a, b = pair
    host = a if which == "source" else b
    host.capabilities = {k: v for k, v in CAPS.items() if k != "page_relay"}  # an agent from before the relay
    assert "resumable page relay" in strategy_support(c, a, b)["post-copy"]
    strategy, why = choose_strategy(c, a, b, "auto")
    assert strategy == "stop-and-copy" and "auto" in why


def test_post_copy_is_refused_for_a_stopped_container(pair):
    c, a, b = pair
    c.state = "STOPPED"
    assert "only a running container" in strategy_support(c, a, b)["post-copy"]


def test_auto_moves_a_stopped_container_cold(pair):
    c, a, b = pair
    c.state = "STOPPED"
    strategy, why = choose_strategy(c, a, b, "auto")
    assert strategy == "restart" and "only a running container" in why


@pytest.mark.parametrize(
    "caps,words",
    [
        ({"arch": "aarch64"}, "aarch64"),
        ({"criu_version": "3.19"}, "older"),
        ({"criu_check": "failed"}, "criu check"),
        ({"network": None}, "network"),
    ],
)
def test_live_strategies_are_refused_with_the_reason(pair, caps, words):
    c, a, b = pair
    b.capabilities = {**CAPS, **caps}
    with pytest.raises(ApiError) as e:
        choose_strategy(c, a, b, "stop-and-copy")
    assert words in str(e.value.detail)
    assert words in strategy_support(c, a, b)["post-copy"]


def test_pre_copy_is_refused_even_where_dirty_memory_is_tracked(pair):
    c, a, b = pair
    a.capabilities = {**CAPS, "dirty_tracking": True}
    assert "end-to-end test" in strategy_support(c, a, b)["pre-copy"]


def test_the_api_refuses_a_strategy_in_preflight_and_changes_nothing(tokens, pair):
    auth = {"HTTP_AUTHORIZATION": f"Token {tokens['bob']}"}
    r = Client().post(
        "/api/v1/containers/c1/migrate",
        {"target_host": "b", "strategy": "pre-copy"},
        content_type="application/json",
        **auth,
    )
    assert r.status_code == 409 and r.json()["field"] == "strategy"
    r = Client().post("/api/v1/containers/c1/migrate", {"target_host": "a"}, content_type="application/json", **auth)
    assert r.status_code == 409 and "already" in r.json()["error"]
    r = Client().post("/api/v1/containers/c1/migrate", {"target_host": "zz"}, content_type="application/json", **auth)
    assert r.status_code == 400 and r.json()["field"] == "target_host"
    assert not Operation.objects.exists()
    r = Client().post("/api/v1/containers/c1/migrate", {"target_host": "b"}, content_type="application/json", **auth)
    assert r.status_code == 202
    op = Operation.objects.get()
    assert (op.kind, op.target_host.name, op.params["strategy"]) == ("migrate", "b", "post-copy")
    targets = Client().get("/api/v1/containers/c1/targets", **auth).json()
    assert targets[0]["host"] == "b" and targets[0]["strategies"]["restart"] is None
