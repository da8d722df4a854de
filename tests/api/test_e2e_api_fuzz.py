"""schemathesis against the OpenAPI schema, with real auth on the real stack: no 5xx, and every
answer matches the schema (status codes, content types, bodies, the error format).

- A viewer's token, here, on the shared stack: reads only, so no host is ever contacted.
- Operator and admin tokens in tests/support/sandboxed_fuzz.py, which writes (adds hosts at generated
  addresses, probes, creates, migrates...) and so runs with its own stack inside a network
  namespace that has only loopback (`unshare --net`): generated addresses go nowhere.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.support.sandboxed_fuzz import CHECKS  # noqa: F401
from tests.support.stack import ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture
def api_schema(stack):
    return schemathesis.openapi.from_url(stack.url + "/api/schema/?format=json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_never_fails_on_generated_input(case, stack):
    response = case.call_and_validate(headers={"Authorization": f"Token {stack.tokens['carol']}"}, checks=CHECKS)
    assert response.status_code < 500


def _sandbox_command() -> list[str] | None:
    """`unshare` into a new network namespace (as root; otherwise in a user namespace too)."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return None
    base = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--net", "--map-root-user"]
    probe = subprocess.run([*base, "true"], capture_output=True)
    return base if probe.returncode == 0 else None


def test_writers_fuzzed_inside_a_network_sandbox(tmp_path):
    """Runs tests/support/sandboxed_fuzz.py in its own network namespace, and reads what it saw."""
    unshare = _sandbox_command()
    if unshare is None:
        pytest.skip("cannot make a network namespace here (unshare --net)")
    report = tmp_path / "report.json"
    env = dict(os.environ, CTWEB_FUZZ_SANDBOX="1", CTWEB_FUZZ_REPORT=str(report))
    # PostgreSQL (CI's second pass) listens on the outer loopback, which the namespace does not
    # have: the sandboxed stack uses its own SQLite file.
    env.pop("DATABASE_URL", None)
    inner = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/support/sandboxed_fuzz.py"]
    script = 'ip link set lo up && exec "$@"'
    p = subprocess.run(
        [*unshare, "sh", "-c", script, "sh", *inner], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    tail = (p.stdout + p.stderr)[-6000:]
    assert p.returncode == 0, tail
    seen = json.loads(report.read_text())
    print(json.dumps(seen, indent=1))
    writes = {k: n for k, n in seen["requests"].items() if k.split()[1] in ("POST", "DELETE") and k.split()[2] == "202"}
    assert any(k.startswith("bob ") for k in writes) and any(k.startswith("alice ") for k in writes), seen["requests"]
    assert seen["operations"], "the fuzzing started no operation at all"
