"""Container lifecycle on the real lab: LXC containers in namespaced hosts, through the API."""

import socket
import subprocess

import pytest

from tests.support.lab import COUNTER, PATTERN, SERVICE, counter, create, on_host, pattern, ping  # noqa: F401
from tests.support.stack import Api, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]


def test_a_busybox_container_runs_a_counter_and_goes_through_its_lifecycle(lab_stack, lab):
    bob = Api(lab_stack, lab_stack.tokens["bob"])
    op = create(bob, name="counter1", host="lab-a", template="busybox", command=["sh", "-c", COUNTER])
    assert op["status"] == "success", op["error"]
    assert [e["phase"] for e in op["events"]][-1] == "success"

    rows = bob.get("/api/v1/containers/?host=lab-a").json()
    row = next(r for r in rows if r["name"] == "counter1")
    assert row["state"] == "RUNNING" and row["ipv4"].startswith("10.")
    assert subprocess.run(["ping", "-c", "1", "-W", "2", row["ipv4"]], capture_output=True).returncode == 0

    first = counter(lab, "lab-a", "counter1")
    wait_for(lambda: counter(lab, "lab-a", "counter1") > first, 10, "the counter to count")

    def state_op(action):
        r = bob.post("/api/v1/containers/counter1/state", json={"action": action})
        assert r.status_code == 202, r.text
        return bob.wait_operation(r.json()["id"], timeout=60)

    assert state_op("stop")["status"] == "success"
    assert bob.get("/api/v1/containers/counter1/").json()["state"] == "STOPPED"
    assert "STOPPED" in on_host(lab, "lab-a", "lxc-info", "-n", "counter1", "-s").stdout

    assert state_op("start")["status"] == "success"
    assert bob.get("/api/v1/containers/counter1/").json()["state"] == "RUNNING"
    assert counter(lab, "lab-a", "counter1") < first + 30  # a cold start counts from 1 again

    assert state_op("restart")["status"] == "success"
    assert bob.get("/api/v1/containers/counter1/").json()["state"] == "RUNNING"

    r = bob("DELETE", "/api/v1/containers/counter1/")
    assert r.status_code == 202
    assert bob.wait_operation(r.json()["id"], timeout=60)["status"] == "success"
    assert bob.get("/api/v1/containers/counter1/").status_code == 404
    assert "counter1" not in on_host(lab, "lab-a", "lxc-ls", "-1").stdout


def test_a_debian_container_serves_tcp_to_the_root_namespace(lab_stack, lab):
    bob = Api(lab_stack, lab_stack.tokens["bob"])
    op = create(bob, name="web1", host="lab-b", template="debian", command=["python3", "-c", SERVICE])
    assert op["status"] == "success", op["error"]
    ip = bob.get("/api/v1/containers/web1/").json()["ipv4"]

    def greet():
        with socket.create_connection((ip, 7000), timeout=2) as s:
            return s.recv(100)

    assert wait_for(greet, 20, "the service") == b"hello from inside\n"
    r = bob("DELETE", "/api/v1/containers/web1/")
    assert bob.wait_operation(r.json()["id"], timeout=60)["status"] == "success"


def test_it_discovers_a_container_made_outside_the_dashboard(lab_stack, lab):
    made = on_host(lab, "lab-b", "lxc-create", "-n", "outsider", "-t", "busybox")
    assert made.returncode == 0, made.stderr
    try:
        alice = Api(lab_stack, lab_stack.tokens["alice"])

        def synced() -> bool:
            # A sync already running is answered instead of a new one, and the periodic refresh
            # may list the host first: it is the record that must appear, by whichever listing.
            r = alice.post("/api/v1/hosts/lab-b/sync")
            assert r.status_code == 202
            op = alice.wait_operation(r.json()["id"])
            assert op["status"] == "success", op
            return alice.get("/api/v1/containers/outsider/").status_code == 200

        wait_for(synced, 60, "a sync of lab-b to list outsider")
        row = alice.get("/api/v1/containers/outsider/").json()
        assert (row["host"], row["state"]) == ("lab-b", "STOPPED")
        # Gone from the host behind our back: deleting the record still works.
        on_host(lab, "lab-b", "lxc-destroy", "-n", "outsider")
        r = alice("DELETE", "/api/v1/containers/outsider/")
        assert alice.wait_operation(r.json()["id"], timeout=60)["status"] == "success"
        assert alice.get("/api/v1/containers/outsider/").status_code == 404
    finally:
        on_host(lab, "lab-b", "lxc-destroy", "-n", "outsider")


def test_a_command_that_exits_at_once_leaves_nothing_behind(lab_stack, lab):
    bob = Api(lab_stack, lab_stack.tokens["bob"])
    op = create(bob, name="quitter", host="lab-a", template="busybox", command=["sh", "-c", "echo bye; exit 3"])
    assert op["status"] == "failure"
    assert "stopped right after it started" in op["error"]
    assert bob.get("/api/v1/containers/quitter/").status_code == 404
    assert "quitter" not in on_host(lab, "lab-a", "lxc-ls", "-1").stdout
    assert not on_host(lab, "lab-a", "test", "-e", "/var/lib/lxc/quitter").returncode == 0


def test_bad_requests_change_nothing_on_the_hosts(lab_stack, lab):
    bob = Api(lab_stack, lab_stack.tokens["bob"])
    before = {h: on_host(lab, h, "lxc-ls", "-1").stdout for h in ("lab-a", "lab-b")}
    cases = [
        ({"name": "x;reboot", "host": "lab-a"}, 400),
        ({"name": "$(id)", "host": "lab-a"}, 400),
        ({"name": "ok1", "host": "lab-a", "template": "../../etc"}, 400),
        ({"name": "ok1", "host": "lab-z"}, 400),
        ({"name": "ok1", "host": "lab-a", "command": {"not": "a list"}}, 400),
    ]
    for body, status in cases:
        r = bob.post("/api/v1/containers/", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]
    # A command with shell characters is the container's business, passed literally.
    op = create(bob, name="literal", host="lab-a", command=["sh", "-c", "echo '$(reboot)' > /tmp/x; exec sleep 600"])
    assert op["status"] == "success", op["error"]
    assert on_host(lab, "lab-a", "lxc-attach", "-n", "literal", "--", "cat", "/tmp/x").stdout == "$(reboot)\n"
    taken = bob.post("/api/v1/containers/", json={"name": "literal", "host": "lab-b"})
    assert taken.status_code == 409
    bob.wait_operation(bob("DELETE", "/api/v1/containers/literal/").json()["id"], timeout=60)
    after = {h: on_host(lab, h, "lxc-ls", "-1").stdout for h in ("lab-a", "lab-b")}
    assert after == before


def test_the_list_is_refreshed_from_the_hosts(lab_stack, lab):
    bob = Api(lab_stack, lab_stack.tokens["bob"])
    assert create(bob, name="drifter", host="lab-a", command=["sleep", "600"])["status"] == "success"
    on_host(lab, "lab-a", "lxc-stop", "-k", "-n", "drifter")  # behind the dashboard's back
    lab_stack.python("from containers.tasks import refresh_container_states; refresh_container_states()")
    assert bob.get("/api/v1/containers/drifter/").json()["state"] == "STOPPED"
    bob.wait_operation(bob("DELETE", "/api/v1/containers/drifter/").json()["id"], timeout=60)
