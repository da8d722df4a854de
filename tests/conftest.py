import fcntl
import os
import re
import subprocess
import time

# Under pytest-xdist each worker gets a lab instance of its own (gw0 -> 1, gw1 -> 2, ...,
# shifted by CTWEB_LAB_BASE so two runs on one machine need not share; lab/core.py: its own
# namespaces, bridge and /24), so lab tests run side by side. Set before anything imports
# lab.core, which reads it once. Two sessions on one instance wait for each other (its lock).
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
# One id for this test run, set by the first process, inherited by xdist workers: the fault
# matrix's sessions write their rows under it and the controller merges them (faults.py).
os.environ.setdefault("CTWEB_TEST_RUN", time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid()}")
if _worker.startswith("gw") and not os.environ.get("CTWEB_LAB_ID"):
    os.environ["CTWEB_LAB_ID"] = str((int(_worker[2:]) + int(os.environ.get("CTWEB_LAB_BASE") or 0)) % 9 + 1)

import pytest  # noqa: E402

from tests.support import lab as lab_support  # noqa: E402
from tests.support.stack import Api, SSHServer, Stack  # noqa: E402

LAB_HOSTS = 2


@pytest.fixture(autouse=True)
def _in_memory_channel_layer(settings):
    # Unit tests publish into memory; the e2e stack has its own real Redis.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    # Hashing is deliberately slow in production; tests create many users.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # Pages render without a collectstatic run (the e2e stack serves the real thing).
    # Debug bundles in memory (a test that looks at files gives its own folder).
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
        "bundles": {"BACKEND": "django.core.files.storage.InMemoryStorage"},
    }


@pytest.fixture(scope="session", autouse=True)
def _fleet_key(tmp_path_factory):
    # The fleet's SSH key, made once for the session (a node never makes one at run time).
    from django.conf import settings

    from hosts import ssh

    settings.SSH_KEY_PATH = tmp_path_factory.mktemp("fleet-key") / "id_ed25519"
    ssh.create_keypair(settings.SSH_KEY_PATH)


def pytest_sessionfinish(session):
    # Whatever fault rows the lab tests recorded: test-artifacts/fault-matrix.md and .json
    # (under xdist each worker keeps its rows and the controller puts this run's together).
    from tests.support import faults

    faults.write_report()


@pytest.fixture(scope="session")
def stack():
    s = Stack()
    try:
        s.start()
    except Exception:
        print(s.logs())
        s.stop()
        raise
    s.tokens = s.make_users()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _stack_logs_have_no_errors(request):
    """Every test that runs the e2e stack leaves no ERROR line in its logs (web, workers,
    beat). A test that causes errors on purpose says which ones, by regular expression:
    @pytest.mark.stack_errors(r"pattern", ...); any other ERROR line fails it."""
    if not ({"stack", "lab_stack"} & set(request.fixturenames)):
        yield
        return
    stack = request.getfixturevalue("stack")
    marks = stack.log_marks()
    yield
    allowed = [re.compile(p) for m in request.node.iter_markers("stack_errors") for p in m.args]
    unexpected = [line for line in stack.errors_since(marks) if not any(p.search(line) for p in allowed)]
    if unexpected:
        pytest.fail("the stack logged errors during this test:\n" + "\n".join(unexpected[:10]), pytrace=False)


@pytest.fixture
def sshd(stack):
    server = SSHServer(stack.dashboard_public_key()).start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """One real lab for the whole run (hosts lab-a, lab-b), taken down at the end."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    from lab import core

    # One session per lab instance (CTWEB_LAB_ID): a second test run of the same instance waits.
    lock = open(core.LOCK_PATH, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)

    tmp = tmp_path_factory.mktemp("labkeys")
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    t0 = time.monotonic()
    hosts = core.up(LAB_HOSTS, (tmp / "id_ed25519.pub").read_text())
    print(f"\nlab up in {time.monotonic() - t0:.1f}s")
    known = tmp / "known_hosts"
    known.write_text("".join(f"{h['address']} {h['host_key']}\n" for h in hosts))
    try:
        yield {"hosts": hosts, "key": key, "known_hosts": known, "pubkey": (tmp / "id_ed25519.pub").read_text()}
    finally:
        core.down()
        lock.close()


@pytest.fixture(scope="session")
def lab_stack(stack, lab):
    """The e2e stack with the lab's hosts registered (keys pinned) and probed."""
    other = lab_support.claim("the e2e stack")
    if other:
        pytest.fail(f"the lab serves {other} in this session; run these tests in a session of their own")
    out = stack.manage("lab", "up", "--hosts", str(LAB_HOSTS))
    assert out.count("probe success") == LAB_HOSTS, out
    return stack


@pytest.fixture
def bob(lab_stack):
    """The operator's API on the lab stack (tests/support/stack.py Api)."""
    return Api(lab_stack, lab_stack.tokens["bob"])


from tests.support.browser import browser, page_as  # noqa: E402,F401  (shared fixtures)
from tests.support.helpers import tokens, trusted_host, users  # noqa: E402,F401  (shared fixtures)
