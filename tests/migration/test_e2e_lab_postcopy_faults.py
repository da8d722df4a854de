"""A post-copy's page path during a real pull, seen by a local unprivileged user of either
host: nothing to connect to, nothing to read. (The post-copy faults, links cut, the worker
or the lazy-pages daemon killed during the pull, are cases of the per-strategy fault matrix,
tests/migration/test_e2e_lab_fault_matrix.py.)

The pull is slowed by a test-only throttle file the test writes into the migration's
root-only directory on the source (see _relay_throttle in the agent)."""

from __future__ import annotations

import re
import time

import pytest

from tests.support.faults import (
    HOSTS,
    hosts_with,  # noqa: F401
    intact,
    leftovers,
    phase,
    shell,
    start,
    throttle,
    unthrottle,
    wait_until,
    worker_log,
)
from tests.support.lab import PATTERN, counter, create
from tests.support.stack import Api, ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]


@pytest.fixture
def patterned(bob, lab):
    names = []

    def make(name):
        ok(create(bob, name=name, host="lab-a", command=["sh", "-c", PATTERN]))
        wait_for(lambda: counter(lab, "lab-a", name) > 2, 30, "counting")
        names.append(name)
        return name

    yield make
    for name in names:
        if bob.get(f"/api/v1/containers/{name}/").status_code == 200:
            run_op(bob, "DELETE", f"/api/v1/containers/{name}/")


def _throttle(lab, op_id: int) -> None:
    throttle(lab, "lab-a", op_id)


def _worker_log(bob) -> str:
    return worker_log(bob.stack, "postcopy-faults-worker.log")


def _intact(lab, host: str, name: str, before: int) -> None:
    intact(lab, host, name, before)


def _clean(lab, name: str) -> None:
    for host in HOSTS:
        assert leftovers(lab, host, name) == [], host


# What a local unprivileged user tries on each host during the pull: connect to any TCP
# port listening there (the old page server and tunnel entrance were loopback ports), to
# the relay's socket, and read the migration's files.
NOBODY = r"""
import glob, os, socket
found = []
for path in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(path).readlines()[1:]:
        f = line.split()
        if f[3] == "0A":
            port = int(f[1].rsplit(":", 1)[1], 16)
            if port == 22:
                continue  # sshd itself
            s = socket.socket(socket.AF_INET6 if path.endswith("6") else socket.AF_INET)
            try:
                s.connect(("::1" if path.endswith("6") else "127.0.0.1", port))
                found.append(f"connected to port {port}")
            except OSError:
                pass
for sock in ["/var/lib/ctweb/migrations/%(op)s/page-relay.sock"]:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sock)
        found.append("connected to " + sock)
    except OSError:
        pass
for root, dirs, files in os.walk("/var/lib/ctweb/migrations"):
    for name in files:
        try:
            open(os.path.join(root, name), "rb").read(1)
            found.append("read " + os.path.join(root, name))
        except OSError:
            pass
print("FOUND", found)
"""


def test_a_local_user_cannot_reach_the_page_path_during_a_post_copy(bob, lab, patterned):
    name = patterned("pc-sec")
    op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "post-copy"})
    _throttle(lab, op_id)
    wait_until(bob, op_id, phase("pages"), "the page pull", timeout=180)
    for host in ("lab-a", "lab-b"):
        script = NOBODY % {"op": op_id}
        out = shell(
            lab,
            host,
            f"cat > /tmp/nobody.py <<'EOF'\n{script}\nEOF\n"
            "chmod 644 /tmp/nobody.py; setpriv --reuid=65534 --regid=65534 --clear-groups python3 /tmp/nobody.py",
        )
        assert "FOUND []" in out.stdout, (host, out.stdout, out.stderr)
        assert shell(lab, host, f"test -S /var/lib/ctweb/migrations/{op_id}/page-relay.sock").returncode == 0, host
    unthrottle(lab, "lab-a", op_id)  # seen mid-pull on both hosts: the rest at full speed
    op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == "success", (op["error"], _worker_log(bob))


def _crash(core, host: str) -> None:
    """The host "crashes": SIGKILL to its init ends its pid namespace, so every process of
    it dies at once (its containers, CRIU, sshd), as lab down() does for each host; its disk
    (the root directory) stays as a crash leaves it."""
    rec = core._read_pidfile(core.hosts_dir() / host)
    assert rec, f"{host} has no recorded init"
    core._stop_pid(rec[0], rec[1], host)


def target_crash_mid_pull(bob, alice, lab, name: str) -> dict:  # noqa: F811
    """Fault: the target host crashes during a post-copy's page pull, then comes back.
    The operation stops with the admin's actions (nothing removed), the test takes "resume
    on the source", the container runs on lab-a with its memory, and once lab-b is back the
    tidy leaves nothing of it there. Returns the fault-matrix row (kept in one function so
    that the matrix helper can take it as it is)."""
    from lab import core

    before = counter(lab, "lab-a", name)
    op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "post-copy"})
    _throttle(lab, op_id)
    wait_until(bob, op_id, phase("pages"), "the page pull", timeout=180)
    time.sleep(1)
    _crash(core, "lab-b")
    try:

        def stopped():  # waiting with a decision, or ended (wait_for would swallow an assert)
            op = bob.get(f"/api/v1/operations/{op_id}/").json()
            ended = op["status"] in ("success", "failure", "cancelled")
            return op if ended or (op["status"] == "waiting" and (op["result"] or {}).get("decision")) else None

        op = wait_for(stopped, 240, "the post-copy to stop with a decision", interval=0.5)
        assert op["status"] == "waiting", (op["status"], op["error"], _worker_log(bob))
        actions = {a["id"]: a for a in op["result"]["decision"]["actions"]}
        assert list(actions) == ["postcopy-resume-source", "keep-waiting"], actions
        resume = actions["postcopy-resume-source"]
        assert re.fullmatch(r"Resume on lab-a from the state of \d\d:\d\d:\d\d UTC", resume["label"]), resume
        assert "what ran on lab-b since is lost" in resume["consequence"], resume
        assert "nothing was removed" in op["result"]["decision"]["sentence"], op["result"]["decision"]
        # Nothing was removed automatically: the source still holds its frozen copy and dump.
        assert hosts_with_up(lab, name, ["lab-a"]) == ["lab-a"]
        assert shell(lab, "lab-a", f"test -d /var/lib/ctweb/migrations/{op_id}").returncode == 0
        assert bob.post(f"/api/v1/operations/{op_id}/decide", json={"action": "keep-waiting"}).status_code == 403
        # "Keep waiting" asks the hosts again at once: lab-b still does not answer, so the
        # recovery waits again with the same actions (it takes no silence for an answer).
        attempts = op["result"]["waiting"]["attempts"]
        r = alice.post(f"/api/v1/operations/{op_id}/decide", json={"action": "keep-waiting"})
        assert r.status_code == 202, r.text

        def waits_again():
            again = stopped()
            return (
                again
                if again and (again["status"] != "waiting" or again["result"]["waiting"]["attempts"] > attempts)
                else None
            )

        op = wait_for(waits_again, 120, "the recovery to wait again", interval=0.5)
        assert op["status"] == "waiting", (op["status"], op["error"], _worker_log(bob))
        assert [a["id"] for a in op["result"]["decision"]["actions"]] == list(actions), op["result"]
        assert shell(lab, "lab-a", f"test -d /var/lib/ctweb/migrations/{op_id}").returncode == 0
        r = alice.post(f"/api/v1/operations/{op_id}/decide", json={"action": "postcopy-resume-source"})
        assert r.status_code == 202, r.text
        op = bob.wait_operation(op_id, timeout=180)
        assert op["status"] == "failure", (op, _worker_log(bob))
        assert op["error"].startswith("Rolled back by an admin's decision: "), op["error"]
        assert "from the state of" in op["error"] and "lab-b since is lost" in op["error"], op["error"]
        assert [d["action"] for d in op["result"]["decisions"]] == ["keep-waiting", "postcopy-resume-source"]
        row = bob.get(f"/api/v1/containers/{name}/").json()
        assert (row["host"], row["state"]) == ("lab-a", "RUNNING"), row
        _intact(lab, "lab-a", name, before)
        audited = bob.stack.python(
            "from core.models import AuditEntry; "
            "print(list(AuditEntry.objects.filter(action='operation.decide').values_list('username', 'detail')))"
        )
        assert "('alice', 'migrate keep-waiting')" in audited, audited
        assert "('alice', 'migrate postcopy-resume-source')" in audited, audited
    finally:
        core.up(2)  # starts the missing host again (its disk as the crash left it); lab-a is left alone
    # lab-b answers again: a probe brings it online, its sync's tidy stops and removes the stale copy.
    assert hosts_with(lab, name) == ["lab-a", "lab-b"]  # the crash left its half-restored copy on disk
    wait_for(lambda: run_op(alice, "POST", "/api/v1/hosts/lab-b/probe")["status"] == "success", 120, "lab-b", 2)
    ok(run_op(bob, "POST", "/api/v1/hosts/lab-b/sync"))
    assert hosts_with(lab, name) == ["lab-a"]
    _clean(lab, name)
    _intact(lab, "lab-a", name, before)
    return {  # a row in the fault matrix's format (tests/support/faults.py, branch h/matrix)
        "strategy": "post-copy",
        "fault": "target host crashed (every process killed)",
        "phase": "page pull",
        "test": "tests/migration/test_e2e_lab_postcopy_faults.py::target_crash_mid_pull",
        "status": op["status"],
        "ended": "RUNNING on lab-a after the admin's 'resume on the source'; nothing left on lab-b",
        "sentence": op["error"][:300],
        "lost": False,
        "survived": True,
    }


def hosts_with_up(lab, name: str, up: list[str]) -> list[str]:
    """hosts_with, asking only the hosts that are up (a host that does not answer fails the
    test with its reason: no answer is not "not there")."""
    found = []
    for h in up:
        r = shell(lab, h, "lxc-ls -1")
        assert r.returncode == 0, f"{h} did not answer: {r.stderr.strip()}"
        found += [h] if name in r.stdout.split() else []
    return found


def test_post_copy_whose_target_host_crashes_waits_for_an_admin_and_resumes_on_the_source(bob, lab, patterned):  # noqa: F811

    alice = Api(bob.stack, bob.stack.tokens["alice"])
    r = alice("PATCH", "/api/v1/settings/", json={"postcopy_stall_limit_s": 30})
    assert r.status_code == 200, r.text
    try:
        row = target_crash_mid_pull(bob, alice, lab, patterned("pc-crash"))
        try:  # the fault matrix, where its helper is merged
            from tests.support.faults import record
        except ImportError:
            record = None
        if record is not None:
            record(**row)
    finally:
        alice("PATCH", "/api/v1/settings/", json={"postcopy_stall_limit_s": 600})
