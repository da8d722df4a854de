"""Stateful snapshots, restore, stateful stop/start and migration, through the dashboard on the lab."""

import io
import tarfile

import pytest

from lab import core
from tests.support.bundle_secrets import leaks, secret_fragments
from tests.support.cli import ctweb
from tests.support.lab import COUNTER, PATTERN, counter, create, on_host, pattern, ping
from tests.support.stack import ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]


@pytest.fixture
def counting(bob, lab):
    ok(create(bob, name="snapc", host="lab-a", command=["sh", "-c", PATTERN]))
    wait_for(lambda: counter(lab, "lab-a", "snapc") > 2, 15, "counting")
    yield "snapc"
    host = bob.get("/api/v1/containers/snapc/").json().get("host")
    if host:
        run_op(bob, "DELETE", "/api/v1/containers/snapc/")


def test_stateful_snapshot_restore_and_history(bob, lab, counting):
    op = ok(run_op(bob, "POST", "/api/v1/containers/snapc/snapshots/", {"stateful": True}))
    phases = [e["phase"] for e in op["events"]]
    assert {"freeze", "dump", "copy"} <= set(phases), phases
    assert op["result"]["stats"]["frozen_time"] > 0 and op["result"]["stats"]["pages_written"] > 0
    at_snapshot = counter(lab, "lab-a", "snapc")
    wait_for(lambda: counter(lab, "lab-a", "snapc") > at_snapshot + 3, 15, "the counter to go on")

    snaps = bob.get("/api/v1/containers/snapc/snapshots/").json()
    assert [(s["name"], s["stateful"]) for s in snaps] == [("snap0", True)]
    assert snaps[0]["size_bytes"] > 0 and snaps[0]["created_by"] == "bob"
    detail = bob.get("/api/v1/containers/snapc/snapshots/snap0/").json()
    commands = [p["command"] for p in detail["contents"]["processes"]]
    assert any("counter" in c for c in commands), commands
    assert all(p["dumped_bytes"] > 0 for p in detail["contents"]["processes"])
    assert any(i["name"] == "pstree.img" for i in detail["contents"]["images"])

    before_restore = counter(lab, "lab-a", "snapc")
    op = ok(run_op(bob, "POST", "/api/v1/containers/snapc/snapshots/snap0/restore"))
    assert op["result"]["stats"]["restore_time"] > 0
    back = counter(lab, "lab-a", "snapc")
    assert back < before_restore and abs(back - at_snapshot) <= 5, (at_snapshot, back, before_restore)
    wait_for(lambda: counter(lab, "lab-a", "snapc") > back + 2, 15, "the restored counter to go on")
    assert bob.get("/api/v1/containers/snapc/").json()["state"] == "RUNNING"

    ok(run_op(bob, "POST", "/api/v1/containers/snapc/snapshots/", {"name": "later", "stateful": True}))
    diff = bob.get("/api/v1/containers/snapc/snapshots/compare?a=snap0&b=later").json()
    assert diff["a"] == "snap0" and "processes_added" in diff
    found = bob.get("/api/v1/snapshots/?q=snapc").json()
    assert {s["name"] for s in found} == {"snap0", "later"}
    ok(run_op(bob, "DELETE", "/api/v1/containers/snapc/snapshots/later/"))
    assert [s["name"] for s in bob.get("/api/v1/containers/snapc/snapshots/").json()] == ["snap0"]


def test_stateful_stop_and_start_keep_the_counter(bob, lab, counting):
    ok(run_op(bob, "POST", "/api/v1/containers/snapc/state", {"action": "stop", "stateful": True}))
    row = bob.get("/api/v1/containers/snapc/").json()
    assert (row["state"], row["has_saved_state"]) == ("STOPPED", True)
    stopped_at = int(on_host(lab, "lab-a", "cat", "/var/lib/lxc/snapc/rootfs/tmp/counter").stdout)
    op = ok(run_op(bob, "POST", "/api/v1/containers/snapc/state", {"action": "start"}))
    assert op["result"]["restored"] is True
    now = counter(lab, "lab-a", "snapc")
    assert stopped_at <= now <= stopped_at + 10, (stopped_at, now)  # continued, not from 1
    row = bob.get("/api/v1/containers/snapc/").json()
    assert (row["state"], row["has_saved_state"]) == ("RUNNING", False)


def _members(gz: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(gz)) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]


def test_a_restore_whose_address_cannot_be_given_back_succeeds_says_why_and_runs(bob, lab):
    """A stateful restore brings the network namespace back as it was dumped, then gives the
    container the address its config names (agent lxc.align_address). When that fails, the
    restore itself stands: the operation succeeds, its result's address_changed.error says what
    failed, and the container runs on. Forced for real: the snapshot's config names another
    address and, as its gateway, the subnet's broadcast address, a default route the kernel
    refuses ("Nexthop has invalid gateway")."""
    ok(create(bob, name="realign", host="lab-a", command=["sh", "-c", COUNTER]))
    try:
        wait_for(lambda: counter(lab, "lab-a", "realign") > 1, 15, "counting")
        ok(run_op(bob, "POST", "/api/v1/containers/realign/snapshots/", {"name": "s1", "stateful": True}))
        net = core.subnet()
        other, broadcast = net.network_address + 249, net.broadcast_address
        config = "/var/lib/ctweb/snapshots/realign/s1/config"
        edit = on_host(
            lab,
            "lab-a",
            f"sed -i -e '/^lxc.net.0.ipv4.gateway/d' -e 's|^lxc.net.0.ipv4.address = .*|"
            f"lxc.net.0.ipv4.address = {other}/{net.prefixlen}\\nlxc.net.0.ipv4.gateway = {broadcast}|' {config}"
            f" && grep -c -e '= {other}/' -e 'gateway = {broadcast}$' {config}",
        )
        assert edit.stdout.strip() == "2", (edit.stdout, edit.stderr)
        op = ok(run_op(bob, "POST", "/api/v1/containers/realign/snapshots/s1/restore"))
        error = op["result"]["address_changed"]["error"]
        assert f"Cannot give realign its address {other}/{net.prefixlen} after its restore" in error, error
        assert "route replace failed" in error, error
        # Only the route failed: its address is the config's, and it says so (not the snapshot's).
        assert op["result"]["address_changed"]["address_given"] is True
        assert any("It runs, with its address but without its default route" in e["message"] for e in op["events"])
        assert ping(str(other))
        assert bob.get("/api/v1/containers/realign/").json()["state"] == "RUNNING"
        at = counter(lab, "lab-a", "realign")
        wait_for(lambda: counter(lab, "lab-a", "realign") > at + 2, 15, "the restored counter to go on")
    finally:
        if bob.get("/api/v1/containers/realign/").status_code == 200:
            run_op(bob, "DELETE", "/api/v1/containers/realign/")


def test_a_refused_dump_leaves_it_running_with_a_bundle(bob, lab, lab_stack, tmp_path):
    refusing = "setsid unshare -U sleep 100000 & " + COUNTER  # CRIU cannot dump nested user namespaces
    ok(create(bob, name="refuser", host="lab-b", command=["sh", "-c", refusing]))
    try:
        op = run_op(bob, "POST", "/api/v1/containers/refuser/snapshots/", {"stateful": True})
        assert op["status"] == "failure"
        assert "CRIU could not dump refuser" in op["error"] and "nested user namespace" in op["error"]
        assert bob.get("/api/v1/containers/refuser/").json()["state"] == "RUNNING"
        assert bob.get("/api/v1/containers/refuser/snapshots/").json() == []
        now = counter(lab, "lab-b", "refuser")
        wait_for(lambda: counter(lab, "lab-b", "refuser") > now + 2, 15, "it to keep counting")

        assert op["result"]["bundle"] == ["lab-b.tar.gz"]
        r = bob.get(f"/api/v1/operations/{op['id']}/bundle")
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/gzip"

        # The terminal client: a failed operation exits 1 with its error, and downloads the same bundle.
        env = {"CTWEB_URL": lab_stack.url, "CTWEB_TOKEN": lab_stack.tokens["bob"]}
        cfg = tmp_path / "ctweb.json"
        again = ctweb(cfg, "snapshot", "refuser", "--stateful", env=env)
        assert again.returncode == 1, again
        said = again.stderr[again.stderr.find("Error: ") :]  # after its progress lines (stderr is not a terminal)
        # The explanation first (the catalogue's sentence and fix, and the host), then the error.
        assert said.startswith(
            "Error: snapshot of refuser failed on lab-b: A process in the container runs in a namespace"
        ), again.stderr
        assert "Fix: " in said and "CRIU could not dump refuser" in said, again.stderr
        assert "nested user namespace" in said and "Traceback" not in again.stderr
        got = ctweb(cfg, "bundle", str(op["id"]), "-o", str(tmp_path / "b.tar.gz"), env=env)
        assert got.returncode == 0, got.stderr
        assert _members(r.content) == _members((tmp_path / "b.tar.gz").read_bytes())  # (packed per request)
        outer = tarfile.open(fileobj=io.BytesIO(r.content))
        inner = tarfile.open(fileobj=outer.extractfile(f"op-{op['id']}/lab-b.tar.gz"))
        names = inner.getnames()
        assert any(n.endswith("host/uname.txt") for n in names), names
        assert any(n.endswith("host/criu-check.txt") for n in names)
        assert any(n.endswith("container/config") for n in names)
        assert not any("id_ed25519" in n or "ssh_host" in n for n in names)
        log = [n for n in names if n.endswith("lxc-checkpoint.log") or n.endswith("dump.log")]
        assert log, names
        # Not only the names: no member's content holds the dashboard's private key, its
        # SECRET_KEY or any API token (tars and gzips inside the bundle are opened too).
        fragments = secret_fragments(
            (lab_stack.var / "ssh" / "id_ed25519").read_text(),
            lab_stack.env["SECRET_KEY"],
            lab_stack.tokens,
        )
        assert len(fragments) >= 6
        assert leaks(r.content, fragments) == []
    finally:
        run_op(bob, "DELETE", "/api/v1/containers/refuser/")


def test_a_failed_restore_leaves_it_stopped_and_startable(bob, lab):
    init = "mkdir -p /data; [ -f /data/held ] || echo keep > /data/held; exec 3</data/held; " + COUNTER
    ok(create(bob, name="holder", host="lab-b", command=["sh", "-c", init]))
    held = "/var/lib/lxc/holder/rootfs/data/held"
    try:
        ok(run_op(bob, "POST", "/api/v1/containers/holder/state", {"action": "stop", "stateful": True}))
        on_host(lab, "lab-b", "mv", held, "/root/held.aside")  # a file its process had open is gone
        op = run_op(bob, "POST", "/api/v1/containers/holder/state", {"action": "start"})
        assert op["status"] == "failure" and "data/held" in op["error"]
        row = bob.get("/api/v1/containers/holder/").json()
        assert (row["state"], row["has_saved_state"]) == ("STOPPED", True)
        on_host(lab, "lab-b", "mv", "/root/held.aside", held)
        op = ok(run_op(bob, "POST", "/api/v1/containers/holder/state", {"action": "start"}))
        assert op["result"]["restored"] is True
        assert bob.get("/api/v1/containers/holder/").json()["state"] == "RUNNING"
    finally:
        run_op(bob, "DELETE", "/api/v1/containers/holder/")


def test_stop_and_copy_migration_there_and_back(bob, lab, counting):
    ok(run_op(bob, "POST", "/api/v1/containers/snapc/snapshots/", {"name": "before-move", "stateful": True}))
    ip = bob.get("/api/v1/containers/snapc/").json()["ipv4"]
    for source, target in (("lab-a", "lab-b"), ("lab-b", "lab-a")):
        before = counter(lab, source, "snapc")
        op = ok(
            run_op(
                bob, "POST", "/api/v1/containers/snapc/migrate", {"target_host": target, "strategy": "stop-and-copy"}
            )
        )
        result = op["result"]
        assert result["strategy"] == "stop-and-copy" and result["bytes_transferred"] > 0
        assert 0 < result["downtime_ms"] < result["total_ms"]
        assert {"preflight_ms", "presync_ms", "dump_ms", "transfer_ms", "restore_ms"} <= set(result["phases"])
        row = bob.get("/api/v1/containers/snapc/").json()
        assert (row["host"], row["state"], row["ipv4"], row["snapshots"]) == (target, "RUNNING", ip, 1)
        after = counter(lab, target, "snapc")
        assert before <= after <= before + 30, (before, after)  # it went on, it did not start over
        wait_for(lambda: counter(lab, target, "snapc") > after, 15, "it to go on")  # noqa: B023
        start, now = pattern(lab, target, "snapc")
        assert start == now  # the memory pattern came along intact
        assert "snapc" not in on_host(lab, source, "lxc-ls", "-1").stdout  # never on two hosts
        assert on_host(lab, target, "test", "-d", "/var/lib/ctweb/snapshots/snapc/before-move").returncode == 0
        assert wait_for(lambda: ping(ip), 10, "the same address to answer")


def test_restart_migration_and_preflight_refusals(bob, lab):
    ok(create(bob, name="cold", host="lab-b", command=["sh", "-c", PATTERN]))
    try:
        drawn = wait_for(lambda: pattern(lab, "lab-b", "cold")[0], 30, "its memory pattern")
        r = bob.post("/api/v1/containers/cold/migrate", json={"target_host": "lab-a", "strategy": "pre-copy"})
        assert r.status_code == 409 and "dirty memory" in r.json()["error"]
        r = bob.post("/api/v1/containers/cold/migrate", json={"target_host": "lab-b"})
        assert r.status_code == 409 and "already" in r.json()["error"]
        op = ok(run_op(bob, "POST", "/api/v1/containers/cold/migrate", {"target_host": "lab-a", "strategy": "restart"}))
        assert op["result"]["strategy"] == "restart"
        row = bob.get("/api/v1/containers/cold/").json()
        assert (row["host"], row["state"]) == ("lab-a", "RUNNING")
        assert counter(lab, "lab-a", "cold") < 30  # a cold start counts from 1 again
        # ... and draws a new memory pattern: what the live strategies' pattern check tells apart
        wait_for(lambda: pattern(lab, "lab-a", "cold")[0] != drawn, 30, "a new pattern after the cold start")
        assert "cold" not in on_host(lab, "lab-b", "lxc-ls", "-1").stdout
    finally:
        run_op(bob, "DELETE", "/api/v1/containers/cold/")


def test_a_migration_whose_dump_fails_leaves_the_source_running_and_nothing_on_the_target(bob, lab):
    refusing = "setsid unshare -U sleep 100000 & " + COUNTER
    ok(create(bob, name="stayer", host="lab-a", command=["sh", "-c", refusing]))
    try:
        op = run_op(
            bob, "POST", "/api/v1/containers/stayer/migrate", {"target_host": "lab-b", "strategy": "stop-and-copy"}
        )
        assert op["status"] == "failure" and "nested user namespace" in op["error"]
        row = bob.get("/api/v1/containers/stayer/").json()
        assert (row["host"], row["state"]) == ("lab-a", "RUNNING")
        assert "stayer" not in on_host(lab, "lab-b", "lxc-ls", "-1").stdout
        assert on_host(lab, "lab-b", "test", "-e", "/var/lib/lxc/stayer").returncode != 0
        now = counter(lab, "lab-a", "stayer")
        wait_for(lambda: counter(lab, "lab-a", "stayer") > now + 2, 15, "it to keep counting")
    finally:
        run_op(bob, "DELETE", "/api/v1/containers/stayer/")


def test_evacuating_a_host_moves_each_container_as_a_child_operation(bob, lab):
    for name in ("evac1", "evac2"):
        ok(create(bob, name=name, host="lab-b", command=["sh", "-c", COUNTER]))
    try:
        op = run_op(bob, "POST", "/api/v1/hosts/lab-b/evacuate", timeout=300)
        assert op["status"] == "success", op["error"]
        assert op["result"]["moved"] == 2 and len(op["result"]["children"]) == 2
        children = [bob.get(f"/api/v1/operations/{c}/").json() for c in op["result"]["children"]]
        assert {(c["kind"], c["parent"], c["status"]) for c in children} == {("migrate", op["id"], "success")}
        for name in ("evac1", "evac2"):
            row = bob.get(f"/api/v1/containers/{name}/").json()
            assert (row["host"], row["state"]) == ("lab-a", "RUNNING")
        assert bob.get("/api/v1/containers/?host=lab-b").json() == []
    finally:
        for name in ("evac1", "evac2"):
            run_op(bob, "DELETE", f"/api/v1/containers/{name}/")
