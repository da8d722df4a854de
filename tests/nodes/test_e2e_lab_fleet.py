"""ctweb as a fleet deploys it (issue 18): two web nodes and two workers, each with its own node
name and var directory, one beat, on one PostgreSQL database and one Redis
(tests/support/multinode.py), against the real lab. A session made on web 1 is good on web 2;
an operation that worker 2 runs streams to a browser's websocket on web 1; a migration whose
worker is SIGKILLed mid-transfer is taken over by the other worker, and the container ends on
one host, running, with its memory.

These tests register the lab's hosts with a dashboard of their own (its own database), so they
run in a pytest session of their own (`-m lab_alone`, as scripts/test.sh does)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
import requests
import websockets

from tests.support import faults as F
from tests.support import lab as lab_support
from tests.support.lab import PATTERN, counter, create
from tests.support.multinode import MultiNodeStack
from tests.support.stack import Api, ok, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab, pytest.mark.lab_alone]


@pytest.fixture(scope="module")
def fleet(lab):
    other = lab_support.claim("the multi-node stack")
    if other:
        pytest.skip(f"the lab serves {other} in this session: run `pytest -m lab_alone` in a session of its own")
    t0 = time.monotonic()
    s = MultiNodeStack()
    try:
        s.start()
        s.tokens = s.make_users()
        out = s.manage("lab", "up", "--hosts", "2")
        assert out.count("probe success") == 2, out
    except BaseException:
        print(s.logs())
        s.stop()
        lab_support.release("the multi-node stack")
        raise
    print(f"\nmulti-node stack up in {time.monotonic() - t0:.1f}s")
    yield s
    s.stop()
    lab_support.release("the multi-node stack")


@pytest.fixture(autouse=True)
def _no_errors_logged(fleet, request):
    """Nothing at ERROR in any node's log, but what a test causes on purpose (stack_errors)."""
    marks = fleet.log_marks()
    yield
    allowed = [re.compile(p) for m in request.node.iter_markers("stack_errors") for p in m.args]
    unexpected = [line for line in fleet.errors_since(marks) if not any(p.search(line) for p in allowed)]
    if unexpected:
        pytest.fail("the nodes logged errors during this test:\n" + "\n".join(unexpected[:10]), pytrace=False)


@pytest.fixture
def made(fleet):
    """Containers a test made, deleted afterwards (through web 1)."""
    bob = Api(fleet, fleet.tokens["bob"])
    names: list[str] = []
    yield names
    for name in names:

        def deleted(name=name):
            if bob.get(f"/api/v1/containers/{name}/").status_code == 404:
                return True
            r = bob("DELETE", f"/api/v1/containers/{name}/")
            if r.status_code == 202:
                bob.wait_operation(r.json()["id"], timeout=120)
            return False

        wait_for(deleted, 180, f"{name} to be deleted", interval=2)


def _login(url: str, username: str) -> requests.Session:
    """Log in through a web node's login form, as a browser does."""
    s = requests.Session()
    form = s.get(url + "/accounts/login/", timeout=10)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
    r = s.post(
        url + "/accounts/login/",
        data={"username": username, "password": f"{username}-password-1", "csrfmiddlewaretoken": token},
        headers={"Referer": url + "/accounts/login/"},
        allow_redirects=False,
        timeout=10,
    )
    assert r.status_code == 302, r.text[:300]
    return s


def test_a_session_made_on_web_1_works_on_web_2(fleet):
    web1, web2 = fleet.urls["web1"], fleet.urls["web2"]
    s = _login(web1, "carol")
    page = s.get(web2 + "/hosts/", allow_redirects=False, timeout=10)
    assert page.status_code == 200, page.status_code
    assert "carol" in page.text and "lab-a" in page.text
    # Each web node serves the static files it collected into its own var directory: the
    # hashed names a page of one names are found on the other.
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    assert assets, page.text[:500]
    for path in assets:
        assert s.get(web1 + path, timeout=10).status_code == 200, path
    api = s.get(web2 + "/api/v1/hosts/", timeout=10)
    assert api.status_code == 200, api.text[:300]
    assert {h["name"] for h in api.json()} >= {"lab-a", "lab-b"}
    # Logged out on web 2: the session is gone on web 1 too.
    form = s.get(web2 + "/hosts/", timeout=10)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
    r = s.post(
        web2 + "/accounts/logout/",
        data={"csrfmiddlewaretoken": token.group(1) if token else s.cookies.get("csrftoken", "")},
        headers={"Referer": web2 + "/hosts/", "X-CSRFToken": s.cookies.get("csrftoken", "")},
        allow_redirects=False,
        timeout=10,
    )
    assert r.status_code in (200, 302), r.status_code
    after = s.get(web1 + "/hosts/", allow_redirects=False, timeout=10)
    assert after.status_code == 302 and "/accounts/login/" in after.headers["Location"], after.status_code


async def _follow(url: str, cookie: str, origin: str, timeout: float) -> list[dict]:
    """Every message of an operation's websocket until it says the operation ended."""
    got = []
    headers = {"Cookie": cookie, "Origin": origin}
    async with websockets.connect(url, additional_headers=headers, open_timeout=10) as ws:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
            got.append(msg)
            if msg["operation"]["status"] in F.FINAL:
                return got
    raise TimeoutError(f"the operation did not end within {timeout}s; got {len(got)} message(s)")


def test_an_operation_run_by_worker_2_streams_to_a_browser_on_web_1(fleet, lab, made):
    """Worker 1 is stopped first, so worker 2 is the only one that can run the operation."""
    web1 = fleet.urls["web1"]
    fleet.procs["worker1"].stop()
    try:
        s = _login(web1, "bob")
        csrf = s.cookies["csrftoken"]
        r = s.post(
            web1 + "/api/v1/containers/",
            json={"name": "mn-stream", "host": "lab-b", "command": ["sh", "-c", lab_support.COUNTER]},
            headers={"X-CSRFToken": csrf, "Referer": web1 + "/"},
            timeout=30,
        )
        assert r.status_code == 202, r.text
        made.append("mn-stream")
        op_id = r.json()["id"]
        cookie = "; ".join(f"{k}={v}" for k, v in s.cookies.items())
        ws_url = web1.replace("http://", "ws://") + f"/ws/operations/{op_id}/"
        messages = asyncio.run(_follow(ws_url, cookie, web1, timeout=120))
    finally:
        fleet.start_worker("worker1")
    assert fleet.worker_of(op_id) == fleet.node_names["worker2"]
    first, live = messages[0], messages[1:]
    assert first["type"] == "state"
    # Updates published by worker 2 reached web 1 through Redis while the operation ran:
    # events of its phases, then its end.
    assert live and all(m["type"] == "operation" for m in live), messages
    running = [m for m in live if m["operation"]["status"] == "running" and m.get("event")]
    assert running, [(m["operation"]["status"], m.get("event")) for m in live]
    assert live[-1]["operation"]["status"] == "success", live[-1]
    assert len({m["event"]["seq"] for m in live if m.get("event")}) >= 2
    assert counter(lab, "lab-b", "mn-stream") >= 1  # the container it made counts


# Where each migration's worker is killed: the images' transfer of a stop-and-copy (the source
# is dumped and stopped: the takeover must resume it there or finish it on the target), the
# page pull of a post-copy (the pump between the hosts' page relays ran in the killed worker:
# the other worker's recovery re-attaches the relays and finishes the pull).
TAKEOVERS = {
    "stop-and-copy": ("transfer", F.phase("transfer", "memory images", 1)),
    "post-copy": ("pages", F.phase("pages")),
}


@pytest.mark.parametrize("strategy", sorted(TAKEOVERS))
@pytest.mark.stack_errors(r"worker1|worker2")  # the killed worker's SSH links die with it
def test_a_migration_whose_worker_is_killed_is_taken_over_by_the_other_worker(fleet, lab, made, request, strategy):
    when, seen = TAKEOVERS[strategy]
    bob = Api(fleet, fleet.tokens["bob"])
    name = f"mn-{strategy}"
    made.append(name)
    # The stop-and-copy carries ~200 MB of memory in its images (a transfer of a second or two).
    memory = "m=$(yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | head -c 200000000); " if strategy == "stop-and-copy" else ""
    ok(create(bob, name=name, host="lab-a", command=["sh", "-c", memory + PATTERN]))
    wait_for(lambda: counter(lab, "lab-a", name) > 2, 60, f"{name} to count")
    before = counter(lab, "lab-a", name)
    op_id = F.start(bob, f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": strategy})
    if strategy == "post-copy":
        F.throttle(lab, "lab-a", op_id)  # a pull of a few seconds, so the kill falls inside it
    # The worker that claimed it (known before the phase, so the kill follows the phase at once).
    mine = wait_for(lambda: fleet.worker_of(op_id), 60, "a worker to claim the migration", interval=0.2)
    killed, other = ("worker1", "worker2") if mine == fleet.node_names["worker1"] else ("worker2", "worker1")
    assert mine == fleet.node_names[killed], mine
    F.wait_until(bob, op_id, seen, f"the {when} of the {strategy}", timeout=120)
    if strategy == "post-copy":
        time.sleep(1)  # well inside the pull
    fleet.procs[killed].kill()
    t_kill = time.monotonic()
    try:
        if strategy == "post-copy":
            F.unthrottle(lab, "lab-a", op_id)  # the rest of the pull at full speed, once taken over
        # What the row said last before its worker died: the phase the kill fell in.
        last = [e for e in bob.get(f"/api/v1/operations/{op_id}/").json()["events"] if e["phase"] != "recovery"][-1]
        F.wait_until(bob, op_id, lambda op: any(e["phase"] == "recovery" for e in op["events"]), "the takeover", 120)
        taken_after = time.monotonic() - t_kill
        op = bob.wait_operation(op_id, timeout=180)
    finally:
        fleet.start_worker(killed)
    assert last["phase"] == when, last  # killed mid-transfer (or mid-pull), not after it
    assert fleet.worker_of(op_id) == fleet.node_names[other]  # the other worker ended it
    err = op["error"] or ""
    assert op["status"] == "failure" and err.startswith("Worker lost"), err
    assert any(e["phase"] == "recovery" for e in op["events"])
    host = F.settled(
        bob,
        lab,
        name,
        op,
        strategy=strategy,
        fault="worker SIGKILLed, taken over by the other worker",
        when=when,
        before=before,
        test=request.node.nodeid.split("::")[-1],
    )
    if strategy == "post-copy":
        assert "every page arrived" in err and host == "lab-b", err
    else:
        assert ("Rolled back" in err and host == "lab-a") or ("runs there now" in err and host == "lab-b"), err
    print(
        f"\n{strategy}: killed {killed} at {last['message']!r}; {other} took it over {taken_after:.1f}s later; "
        f"on {host}: {err}"
    )
