"""A post-copy's page path during a real pull, seen by a local unprivileged user of either
host: nothing to connect to, nothing to read. (The post-copy faults, links cut, the worker
or the lazy-pages daemon killed during the pull, are cases of the per-strategy fault matrix,
tests/test_e2e_lab_fault_matrix.py.)

The pull is slowed by a test-only throttle file the test writes into the migration's
root-only directory on the source (see _relay_throttle in the agent)."""

from __future__ import annotations

import pytest

from tests.stack import Api, ok, run_op, wait_for
from tests.support.faults import HOSTS, intact, leftovers, phase, shell, start, throttle, wait_until, worker_log
from tests.test_e2e_lab_containers import PATTERN, counter, create

pytestmark = [pytest.mark.e2e, pytest.mark.lab]


@pytest.fixture
def bob(lab_stack):
    return Api(lab_stack, lab_stack.tokens["bob"])


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
    op = bob.wait_operation(op_id, timeout=300)
    assert op["status"] == "success", (op["error"], _worker_log(bob))
