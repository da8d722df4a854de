"""Post-copy live migration (CRIU lazy pages) through the dashboard on the lab."""

import json

import pytest

from tests.support.lab import COUNTER, PATTERN, counter, create, init_task, on_host, pattern, ping
from tests.support.stack import ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]


@pytest.fixture
def lazy(bob, lab):
    ok(create(bob, name="lazyc", host="lab-a", command=["sh", "-c", PATTERN]))
    wait_for(lambda: counter(lab, "lab-a", "lazyc") > 2, 15, "counting")
    yield "lazyc"
    if bob.get("/api/v1/containers/lazyc/").json().get("host"):
        run_op(bob, "DELETE", "/api/v1/containers/lazyc/")


def test_post_copy_migration_there_and_back(bob, lab, lazy):
    ip = bob.get("/api/v1/containers/lazyc/").json()["ipv4"]
    targets = {t["host"]: t for t in bob.get("/api/v1/containers/lazyc/targets").json()}
    assert targets["lab-b"]["strategies"]["post-copy"] is None, targets["lab-b"]
    for source, target in (("lab-a", "lab-b"), ("lab-b", "lab-a")):
        before = counter(lab, source, "lazyc")
        op = ok(
            run_op(bob, "POST", "/api/v1/containers/lazyc/migrate", {"target_host": target, "strategy": "post-copy"})
        )
        result = op["result"]
        assert result["strategy"] == "post-copy" and result["bytes_transferred"] > 0
        assert 0 < result["downtime_ms"] < result["total_ms"]
        assert "resumable page relays" in result["transport"]
        assert result["page_bytes"] > 0  # the memory came through the tunnel, not in the images
        assert {"pages"} <= {e["phase"] for e in op["events"]}
        row = bob.get("/api/v1/containers/lazyc/").json()
        assert (row["host"], row["state"], row["ipv4"]) == (target, "RUNNING", ip)
        after = counter(lab, target, "lazyc")
        assert before <= after <= before + 30, (before, after)  # it went on, it did not start over
        wait_for(lambda: counter(lab, target, "lazyc") > after + 1, 15, "it to keep counting")  # noqa: B023
        start, now = pattern(lab, target, "lazyc")
        assert start == now  # every page of the memory pattern arrived intact
        assert "lazyc" not in on_host(lab, source, "lxc-ls", "-1").stdout  # never on two hosts
        assert on_host(lab, source, "test", "-e", f"/var/lib/ctweb/migrations/{op['id']}").returncode != 0
        assert wait_for(lambda: ping(ip), 10, "the same address to answer")  # noqa: B023


def _agent(lab, host: str, sub: str, params: dict) -> dict:
    """Run one agent subcommand on a lab host as the dashboard would, and return its last line."""
    from hosts.agent import agent_file_name
    from hosts.ssh import REMOTE_AGENT_DIR

    path = f"{REMOTE_AGENT_DIR}/{agent_file_name()}"
    out = on_host(lab, host, f"echo '{json.dumps(params)}' | python3 {path} {sub}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_lazy_dump_that_is_not_restored_elsewhere_gives_the_source_back(bob, lab, lazy):
    """The recovery of a post-copy that failed before the target resumed: the source's
    images hold no memory, but the dump still holds the frozen tasks; interrupting its
    page server makes CRIU roll the dump back and let them run on."""
    base = {"name": "lazyc", "migration": 990001}
    dumped = _agent(lab, "lab-a", "migrate-dump", {**base, "lazy": True})
    assert dumped["type"] == "result", dumped
    assert dumped["data"]["relay"]  # the page server serves its page relay (no port listens)
    frozen = counter(lab, "lab-a", "lazyc")
    resumed = _agent(lab, "lab-a", "migrate-resume", base)
    assert resumed["type"] == "result" and resumed["data"]["state"] == "RUNNING", resumed
    assert resumed["data"]["network_unlocked"], resumed  # CRIU leaves its network lock behind
    assert frozen <= counter(lab, "lab-a", "lazyc") <= frozen + 30  # it went on, not from 1
    wait_for(lambda: counter(lab, "lab-a", "lazyc") > frozen + 2, 15, "it to keep counting")
    assert _agent(lab, "lab-a", "migrate-cleanup", {**base, "remove": False})["type"] == "result"
    row = bob.get("/api/v1/containers/lazyc/").json()
    assert (row["host"], row["state"]) == ("lab-a", "RUNNING")
    assert wait_for(lambda: ping(bob.get("/api/v1/containers/lazyc/").json()["ipv4"]), 10, "its address to answer")


def test_a_post_copy_whose_restore_fails_resumes_the_source_and_cleans_the_target(bob, lab):
    init = "mkdir -p /data; [ -f /data/held ] || echo keep > /data/held; exec 3</data/held; " + COUNTER
    ok(create(bob, name="lazyh", host="lab-a", command=["sh", "-c", init]))
    held = "/var/lib/lxc/lazyh/rootfs/data/held"
    # On the target, the held file vanishes as soon as the rootfs copy brings it: the
    # delta does not bring it again (unchanged), so CRIU's restore there cannot open it.
    on_host(
        lab,
        "lab-b",
        f"timeout 120 sh -c 'while true; do rm -f {held}; sleep 0.02; done' >/dev/null 2>&1 & echo $! >/root/rm.pid",
    )
    try:
        wait_for(lambda: counter(lab, "lab-a", "lazyh") > 2, 15, "counting")
        before, task = counter(lab, "lab-a", "lazyh"), init_task(lab, "lab-a", "lazyh")
        op = run_op(bob, "POST", "/api/v1/containers/lazyh/migrate", {"target_host": "lab-b", "strategy": "post-copy"})
        assert op["status"] == "failure", op
        assert "data/held" in op["error"] + (op.get("details") or ""), op
        assert "was resumed on lab-a" in op["error"], op["error"]
        row = bob.get("/api/v1/containers/lazyh/").json()
        assert (row["host"], row["state"]) == ("lab-a", "RUNNING")
        now = counter(lab, "lab-a", "lazyh")
        # resumed, not restarted: the same init task (on a loaded machine the failed restore,
        # the resume and the debug bundle may take more than 30 of its ticks)
        assert init_task(lab, "lab-a", "lazyh") == task and now >= before, (before, now)
        wait_for(lambda: counter(lab, "lab-a", "lazyh") > now + 2, 15, "it to keep counting")
        assert "lazyh" not in on_host(lab, "lab-b", "lxc-ls", "-1").stdout
        assert on_host(lab, "lab-b", "test", "-e", "/var/lib/lxc/lazyh").returncode != 0
        assert on_host(lab, "lab-b", "pgrep", "-x", "criu").returncode != 0  # no lazy-pages daemon left
        assert wait_for(lambda: ping(row["ipv4"]), 10, "its address to answer")
    finally:
        on_host(lab, "lab-b", "sh -c 'kill $(cat /root/rm.pid)'")
        run_op(bob, "DELETE", "/api/v1/containers/lazyh/")
