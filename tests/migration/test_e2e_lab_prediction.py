"""Predictions on the lab: a dry run answers every strategy with numbers and starts nothing; a
downtime budget picks a strategy whose prediction fits, or is refused with the numbers; the
migration keeps its prediction beside what it measured."""

import pytest
import requests

from tests.support.lab import COUNTER, counter, create
from tests.support.stack import ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

MIB = 1 << 20
# 24 MiB held in a shell variable (docs/LAB-NOTES.md), then the counter
HOLD = "v=$(yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | head -c 25165824); " + COUNTER


@pytest.fixture
def held(bob, lab):
    ok(create(bob, name="predc", host="lab-a", command=["sh", "-c", HOLD]))
    wait_for(lambda: counter(lab, "lab-a", "predc") > 2, 30, "counting")
    yield "predc"
    if bob.get("/api/v1/containers/predc/").json().get("host"):
        run_op(bob, "DELETE", "/api/v1/containers/predc/")


def _session(bob) -> requests.Session:
    """bob's browser session: the operation page is a page, not the API."""
    s = requests.Session()
    s.get(f"{bob.stack.url}/accounts/login/", timeout=30)
    r = s.post(
        f"{bob.stack.url}/accounts/login/",
        data={"username": "bob", "password": "bob-password-1", "csrfmiddlewaretoken": s.cookies["csrftoken"]},
        headers={"Referer": f"{bob.stack.url}/accounts/login/"},
        timeout=30,
    )
    assert r.status_code == 200 and "sessionid" in s.cookies, r.text[:300]
    return s


def _ops(bob) -> list:
    return bob.get("/api/v1/operations/?container=predc&kind=migrate").json()


def test_dry_run_budget_and_the_prediction_kept(bob, lab, held):
    r = bob.post("/api/v1/containers/predc/migrate", json={"target_host": "lab-b", "dry_run": True})
    assert r.status_code == 200, r.text
    plan = r.json()
    assert plan["inputs"]["memory_bytes"] >= 20 * MIB, plan["inputs"]
    assert plan["inputs"]["rootfs_bytes"] > 0 and plan["inputs"]["write_sample"]["seconds"] >= 0.9
    for strategy in ("stop-and-copy", "post-copy", "restart"):
        row = plan["strategies"][strategy]
        assert row["possible"] and row["why_not"] is None, (strategy, row)
        assert 0 < row["predicted_downtime_ms"] < row["predicted_total_ms"], (strategy, row)
    assert plan["strategies"]["pre-copy"]["possible"] is False
    assert _ops(bob) == []  # it started nothing
    assert bob.get("/api/v1/containers/predc/").json()["host"] == "lab-a"

    # a budget nothing live fits: refused with the numbers, nothing started
    r = bob.post("/api/v1/containers/predc/migrate", json={"target_host": "lab-b", "max_downtime_ms": 1})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert "No strategy fits a downtime of 1 ms" in error
    assert "post-copy is predicted" in error and "stop-and-copy is predicted" in error
    assert _ops(bob) == []

    # a budget stop-and-copy fits and post-copy does not (when post-copy is predicted slower):
    # whichever, the strategy picked is one whose prediction fits, in auto's order
    sc = plan["strategies"]["stop-and-copy"]["predicted_downtime_ms"]
    pc = plan["strategies"]["post-copy"]["predicted_downtime_ms"]
    budget = int(max(sc, pc)) + 1
    r = bob.post("/api/v1/containers/predc/migrate", json={"target_host": "lab-b", "max_downtime_ms": budget})
    assert r.status_code == 202, r.text
    op = ok(bob.wait_operation(r.json()["id"], timeout=300))
    assert op["result"]["strategy"] == "post-copy"  # auto's first choice, and it fits
    kept = op["result"]["prediction"]
    assert kept["strategy"] == "post-copy" and kept["predicted_downtime_ms"] <= budget
    assert kept["inputs"]["memory_bytes"] >= 20 * MIB
    page = _session(bob).get(f"{bob.stack.url}/operations/{op['id']}/", timeout=30)
    assert page.status_code == 200 and 'id="prediction-table"' in page.text, page.text[:300]
    assert f"{round(kept['predicted_downtime_ms'])} ms</td><td>{round(op['result']['downtime_ms'])} ms" in page.text

    # back with a plain stop-and-copy: the prediction is made when it starts, from its preflight
    op = ok(
        run_op(bob, "POST", "/api/v1/containers/predc/migrate", {"target_host": "lab-a", "strategy": "stop-and-copy"})
    )
    kept = op["result"]["prediction"]
    assert kept["strategy"] == "stop-and-copy" and kept["predicted_downtime_ms"] > 0
    assert kept["inputs"]["memory_bytes"] >= 20 * MIB
    print("\npredicted vs actual (stop-and-copy back):", kept["predicted_downtime_ms"], op["result"]["downtime_ms"])
