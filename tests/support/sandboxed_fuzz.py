"""schemathesis with write rights (operator and admin tokens), run only inside a network
namespace that has nothing but loopback.

Not collected by a plain `pytest` run: tests/api/test_e2e_api_fuzz.py starts it as
`unshare --net` + `pytest tests/support/sandboxed_fuzz.py`, with its own stack (Redis, worker, Daphne,
SQLite) inside the namespace. Generated host addresses are whatever hypothesis makes up; in
here none of them leads anywhere, and the session fixture refuses to run a single test unless
that is so. Path parameters are often swapped for the names of real seeded objects, so writes
get past the 404s and really start operations (probes, creates, snapshots, migrations...).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import zlib
from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.stack import Api, wait_for

pytestmark = pytest.mark.e2e

# An address that would be reachable from the machine when the lab is up (and is the lab's, so
# even a broken sandbox sends nothing outside it): from inside, it must be unreachable.
PROOF_ADDRESS = "10.77.64.250"
EXAMPLES = int(os.environ.get("CTWEB_FUZZ_EXAMPLES", "15"))
SEEN: Counter = Counter()


def interfaces() -> list[str]:
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":")[0].strip() for line in lines)


def routes() -> list[str]:
    v4 = Path("/proc/self/net/route").read_text().splitlines()[1:]
    v6 = [line for line in Path("/proc/self/net/ipv6_route").read_text().splitlines() if not line.endswith(" lo")]
    return v4 + v6


def outside_is_unreachable() -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect((PROOF_ADDRESS, 22))
        except OSError as e:
            return e.errno == errno.ENETUNREACH
    return False


@pytest.fixture(scope="session", autouse=True)
def sandbox():
    """Nothing here runs unless this process sees only loopback, no route, and cannot connect out."""
    assert os.environ.get("CTWEB_FUZZ_SANDBOX") == "1", "run through tests/api/test_e2e_api_fuzz.py"
    assert interfaces() == ["lo"], interfaces()
    assert routes() == [], routes()
    assert outside_is_unreachable()


@pytest.fixture(scope="session")
def seeded(stack):
    """Hosts (one on loopback port 1, one at PROOF_ADDRESS), containers, a snapshot, an operation."""
    out = stack.python(
        f"""
import json
from hosts.models import Host
from containers.models import Container, Snapshot
from operations.models import Operation
from django.contrib.auth import get_user_model
caps = {{"templates": ["busybox"], "arch": "x86_64", "criu_check": "ok", "criu_version": "4.0",
        "network": {{"subnet": "10.9.9.0/24", "range": [100, 200]}}}}
key = dict(key_type="ssh-ed25519", key_data="AAAAC3NzaC1lZDI1NTE5AAAAIGbXYqIV8bzRLxNfJ6vHR5cP2xvQ6QFqD7PbSqPXW0Mg",
           fingerprint="SHA256:x", status="online", capabilities=caps)
h1 = Host.objects.create(name="h1", address="127.0.0.1", port=1, **key)
h2 = Host.objects.create(name="h2", address="{PROOF_ADDRESS}", port=22, **key)
c1 = Container.objects.create(name="c1", host=h1, state="RUNNING", ipv4="10.9.9.100")
Container.objects.create(name="c2", host=h2, state="STOPPED", ipv4="10.9.9.101")
Snapshot.objects.create(container=c1, name="s1", stateful=False)
op = Operation.objects.create(kind="probe", host=h1, status="failure", error="seeded",
                              created_by=get_user_model().objects.get(username="alice"))
print(json.dumps({{"op": op.pk}}))
"""
    )
    return json.loads(out.strip().splitlines()[-1])


def test_a_real_address_is_never_reached(stack, seeded):
    """The proof that generated addresses go nowhere: adding a host at PROOF_ADDRESS fails at
    once, unreachable; probing the seeded host there ends in a failed operation."""
    admin, operator = Api(stack, stack.tokens["alice"]), Api(stack, stack.tokens["bob"])
    r = admin.post("/api/v1/hosts/", json={"name": "proof", "address": PROOF_ADDRESS, "port": 22})
    assert r.status_code == 400 and "unreachable" in r.json()["error"].lower(), r.text
    r = operator.post("/api/v1/hosts/h2/probe")
    assert r.status_code == 202
    op = operator.wait_operation(r.json()["id"], timeout=60)
    assert op["status"] == "failure" and "unreachable" in op["error"].lower(), op


# --- generated input ------------------------------------------------------------------------


@pytest.fixture
def api_schema(stack):
    return schemathesis.openapi.from_url(stack.url + "/api/schema/?format=json")


schema = schemathesis.pytest.from_fixture("api_schema")

REAL = {
    "name": {"hosts": ["h1", "h2"], "containers": ["c1", "c2"]},
    "snap": ["s1"],
}


def _swap_in_real_names(case, seeded) -> None:
    """Two cases in three name real objects (in the path, and hosts and templates in the body),
    so writes reach the code that starts operations."""
    params = case.path_parameters or {}
    pick = zlib.crc32(repr((case.method, case.path, params, case.query, case.body)).encode())
    if pick % 3 == 0:
        return
    body = case.body if isinstance(case.body, dict) else {}
    for key, choices in (("host", ["h1", "h2"]), ("target_host", ["h2", "h1"]), ("template", ["busybox"])):
        if isinstance(body.get(key), str):
            body[key] = choices[pick % len(choices)]
    for key in list(params):
        if key == "name":
            choices = REAL["name"]["hosts" if "/hosts/" in case.path else "containers"]
            params[key] = choices[pick % len(choices)]
        elif key == "snap":
            params[key] = "s1"
        elif key == "op_id":
            params[key] = seeded["op"]


def _fuzz(case, who, stack, seeded) -> None:
    _swap_in_real_names(case, seeded)
    response = case.call_and_validate(headers={"Authorization": f"Token {stack.tokens[who]}"}, checks=CHECKS)
    SEEN[(who, case.method, response.status_code)] += 1


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_an_operator_gets_no_5xx_and_answers_match_the_schema(case, stack, seeded):
    _fuzz(case, "bob", stack, seeded)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_an_admin_gets_no_5xx_and_answers_match_the_schema(case, stack, seeded):
    _fuzz(case, "alice", stack, seeded)


def test_every_operation_the_fuzzing_started_ended_without_a_host(stack):
    """Runs last: the operations generated writes started all end, none of them by reaching a host."""
    api = Api(stack, stack.tokens["carol"])

    def settled():
        ops = api.get("/api/v1/operations/?limit=500").json()
        return ops if all(o["status"] not in ("pending", "running") for o in ops) else None

    ops = wait_for(settled, 120, "the generated operations to end", interval=0.5)
    kinds = Counter((o["kind"], o["status"]) for o in ops)
    report = {
        "requests": {f"{w} {m} {s}": n for (w, m, s), n in sorted(SEEN.items())},
        "operations": {f"{k} {s}": n for (k, s), n in sorted(kinds.items())},
        "errors": sorted({o["error"].split("\n")[0][:120] for o in ops if o["error"]}),
    }
    Path(os.environ["CTWEB_FUZZ_REPORT"]).write_text(json.dumps(report, indent=1))
    assert sum(SEEN.values()) > 0
    # Anything that needs a host can only have failed (or been cancelled before it ran).
    reached = [o for o in ops if o["status"] == "success" and o["kind"] not in ("evacuate",)]
    assert reached == [], reached


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]
