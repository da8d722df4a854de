"""Post-copy faults during the page pull, on the real lab: the pages go through both
hosts' resumable page relays, so a broken link pauses the pull and it goes on when the
link is back; a dead lazy-pages daemon on the target puts the container back on the
source from its frozen state. After each: one host, running, memory pattern intact,
counter not restarted, nothing left over, the operation ended with an honest sentence.

The pull is slowed by a test-only throttle file the test writes into the migration's
root-only directory on the source (see _relay_throttle in the agent)."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.migration.test_e2e_lab_faults import _link, bob, hosts_with, phase, shell, start, wait_until  # noqa: F401
from tests.support.lab import PATTERN, counter, create, pattern
from tests.support.stack import ROOT, ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

THROTTLE = 32 * 1024  # bytes per relay send, 10 sends a second: about 320 KiB/s


@pytest.fixture
def patterned(bob, lab):  # noqa: F811
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


def _worker_log(bob) -> str:  # noqa: F811
    """The worker's log, kept in test-artifacts/ for a failed run."""
    procs = getattr(bob.stack, "procs", {})
    text = "\n".join(p.tail(400) for k, p in procs.items() if "worker" in k)
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / "postcopy-faults-worker.log").write_text(text)
    return "see test-artifacts/postcopy-faults-worker.log"


def _throttle(lab, op_id: int) -> None:
    d = f"/var/lib/ctweb/migrations/{op_id}"
    wait_for(lambda: shell(lab, "lab-a", f"test -d {d}").returncode == 0, 30, "the migration directory", interval=0.05)
    shell(lab, "lab-a", f"echo {THROTTLE} > {d}/TEST-ONLY-throttle")


def _clean(lab, name: str) -> None:
    """No migration directory, CRIU process or page relay left (lxc-checkpoint -r leaves the
    container's own monitor under that name, "[lxc monitor]": not a leftover)."""
    for host in ("lab-a", "lab-b"):
        left = shell(lab, host, "ls /var/lib/ctweb/migrations/ 2>/dev/null; true").stdout.split()
        assert left == [], (host, left)
        procs = shell(
            lab,
            host,
            "ps -eo comm,args | grep -E '^(criu|lxc-checkpoint) |pages-relay' | grep -v -e grep -e 'lxc monitor'; true",
        )
        assert procs.stdout.strip() == "", (host, procs.stdout)


def _intact(lab, host: str, name: str, before: int) -> None:
    wait_for(lambda: counter(lab, host, name) > before, 30, "it to keep counting")
    now = counter(lab, host, name)
    assert before <= now <= before + 200, (before, now)  # it went on, it did not start over
    start_sum, now_sum = pattern(lab, host, name)
    assert start_sum == now_sum  # the memory pattern is the one it drew before the move


@pytest.mark.parametrize(
    "host,seconds",
    [
        ("lab-b", 45),  # the headline case: the target's link, 45 s
        ("lab-a", 15),  # the source's link, just past the dead-link time (CTWEB_SSH_DEAD_AFTER=10 in the stack)
    ],
)
def test_post_copy_survives_a_link_down_during_the_pull(bob, lab, patterned, host, seconds):  # noqa: F811
    from lab import core

    name = patterned(f"pc-cut-{host[-1]}")
    before = counter(lab, "lab-a", name)
    op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "post-copy"})
    _throttle(lab, op_id)
    wait_until(bob, op_id, phase("pages"), "the page pull", timeout=180)
    time.sleep(1)
    _link(core, host, up=False)
    try:
        time.sleep(seconds)
    finally:
        _link(core, host, up=True)
    op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == "success", (op["error"], op.get("details"), _worker_log(bob))
    assert op["result"]["page_relay"]["rounds"] >= 2, op["result"]  # it re-attached after the cut
    row = bob.get(f"/api/v1/containers/{name}/").json()
    assert (row["host"], row["state"]) == ("lab-b", "RUNNING")
    assert hosts_with(lab, name) == ["lab-b"]
    _intact(lab, "lab-b", name, before)
    _clean(lab, name)


def test_post_copy_whose_lazy_pages_dies_resumes_on_the_source(bob, lab, patterned):  # noqa: F811
    name = patterned("pc-lp")
    before = counter(lab, "lab-a", name)
    op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "post-copy"})
    _throttle(lab, op_id)
    wait_until(bob, op_id, phase("pages"), "the page pull", timeout=180)
    time.sleep(1)
    info = json.loads(shell(lab, "lab-b", f"cat /var/lib/ctweb/migrations/{op_id}/lazy-pages.json").stdout)
    assert shell(lab, "lab-b", f"kill -9 {int(info['pid'])}").returncode == 0
    op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == "failure", (op, _worker_log(bob))
    assert "was resumed on lab-a" in op["error"], op["error"]
    row = bob.get(f"/api/v1/containers/{name}/").json()
    assert (row["host"], row["state"]) == ("lab-a", "RUNNING"), row
    assert hosts_with(lab, name) == ["lab-a"]
    _intact(lab, "lab-a", name, before)
    _clean(lab, name)


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


def test_a_local_user_cannot_reach_the_page_path_during_a_post_copy(bob, lab, patterned):  # noqa: F811
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
    op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == "success", (op["error"], _worker_log(bob))


def test_post_copy_goes_on_after_the_worker_is_killed_during_the_pull(bob, lab, lab_stack, patterned):  # noqa: F811
    name = patterned("pc-wk")
    before = counter(lab, "lab-a", name)
    op_id = start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "post-copy"})
    _throttle(lab, op_id)
    wait_until(bob, op_id, phase("pages"), "the page pull", timeout=180)
    time.sleep(1)
    lab_stack.procs["worker"].kill()  # the pump and its SSH channels die with it
    time.sleep(5)
    lab_stack.start_worker()
    op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == "failure" and op["error"].startswith("Worker lost"), (op["error"], _worker_log(bob))
    assert "every page arrived" in op["error"], (op["error"], _worker_log(bob))
    row = bob.get(f"/api/v1/containers/{name}/").json()
    assert (row["host"], row["state"]) == ("lab-b", "RUNNING"), row
    assert hosts_with(lab, name) == ["lab-b"]
    _intact(lab, "lab-b", name, before)
    _clean(lab, name)


def _crash(core, host: str) -> None:
    """The host "crashes": SIGKILL to its init ends its pid namespace, so every process of
    it dies at once (its containers, CRIU, sshd), as lab down() does for each host; its disk
    (the root directory) stays as a crash leaves it."""
    rec = core._read_pidfile(core.lab_dir() / "hosts" / host)
    assert rec, f"{host} has no recorded init"
    core._stop_pid(rec[0], rec[1], host)


def target_crash_mid_pull(bob, alice, lab, name: str) -> dict:  # noqa: F811
    """Fault: the target host crashes during a post-copy's page pull, then comes back.
    The operation stops with the admin's actions (nothing removed), the test takes "resume
    on the source", the container runs on lab-a with its memory, and once lab-b is back the
    tidy leaves nothing of it there. Returns the fault-matrix row (kept in one function so
    that the matrix helper can take it as it is)."""
    from hosts.lab import core

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
    """hosts_with, asking only the hosts that are up."""
    return [h for h in up if name in shell(lab, h, "lxc-ls -1").stdout.split()]


def test_post_copy_whose_target_host_crashes_waits_for_an_admin_and_resumes_on_the_source(bob, lab, patterned):  # noqa: F811
    from tests.support.stack import Api

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
