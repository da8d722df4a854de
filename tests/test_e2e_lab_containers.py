"""Container lifecycle on the real lab: LXC containers in namespaced hosts, through the API."""

import socket
import subprocess

import pytest

from tests.stack import Api, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 1; done"
# A known memory pattern: 8 MB of random hex held only in the shell's memory. Its checksum
# is written once at start (pattern.start) and again every second (pattern.now): the two
# agree only while that very memory lives on (a cold start draws a new pattern).
PATTERN = (
    "v=$(head -c 4000000 /dev/urandom | od -An -tx1 | tr -d ' \\n'); echo \"$v\" | md5sum > /tmp/pattern.start; "
    'i=0; while true; do i=$((i+1)); echo "$v" | md5sum > /tmp/pattern.now; echo $i > /tmp/counter; sleep 1; done'
)
SERVICE = (
    "import socket\n"
    "s = socket.socket(); s.bind(('0.0.0.0', 7000)); s.listen()\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(b'hello from inside\\n'); c.close()\n"
)


def on_host(lab, name: str, *argv: str) -> subprocess.CompletedProcess:
    """Run a command on a lab host as an operator would: over SSH with its pinned key."""
    host = next(h for h in lab["hosts"] if h["name"] == name)
    return subprocess.run(
        [
            "ssh",
            "-i",
            str(lab["key"]),
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={lab['known_hosts']}",
            "-o",
            "StrictHostKeyChecking=yes",
            f"root@{host['address']}",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def create(api: Api, **body) -> dict:
    r = api.post("/api/v1/containers/", json=body)
    assert r.status_code == 202, r.text
    return api.wait_operation(r.json()["id"], timeout=120)


def ping(ip: str) -> bool:
    return subprocess.run(["ping", "-c", "1", "-W", "1", ip], capture_output=True).returncode == 0


def pattern(lab, host: str, name: str) -> tuple[str, str]:
    """(checksum at start, checksum now) of a PATTERN container's memory. The shell rewrites
    pattern.now every second: a read that catches it half-written is taken again."""

    def read():
        out = on_host(lab, host, "lxc-attach", "-n", name, "--", "cat", "/tmp/pattern.start", "/tmp/pattern.now")
        assert out.returncode == 0, out.stderr
        sums = [line.split()[0] for line in out.stdout.splitlines() if len(line.split()) == 2]
        return (sums[0], sums[1]) if len(sums) == 2 else None

    return wait_for(read, 10, f"{name}'s memory pattern checksums", interval=0.2)


def counter(lab, host: str, name: str) -> int:
    out = on_host(lab, host, "lxc-attach", "-n", name, "--", "cat", "/tmp/counter")
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


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
        r = alice.post("/api/v1/hosts/lab-b/sync")
        assert r.status_code == 202
        op = alice.wait_operation(r.json()["id"])
        assert op["status"] == "success" and "outsider" in op["result"]["added"]
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
    lab_stack.python("from operations.tasks import refresh_container_states; refresh_container_states()")
    assert bob.get("/api/v1/containers/drifter/").json()["state"] == "STOPPED"
    bob.wait_operation(bob("DELETE", "/api/v1/containers/drifter/").json()["id"], timeout=60)
