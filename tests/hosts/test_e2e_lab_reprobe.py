"""A host marked offline after a network failure comes back online by itself, on the real
lab: its link is cut, a probe marks it offline, and the scheduled re-probe (called here as
beat calls it: the task sent through the broker to the stack's worker; the stack's own beat
ticks too) tries it again with backoff until it answers, with no one probing it by hand."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.faults import link
from tests.support.stack import Api, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

TICK = (
    "from hosts.tasks import reprobe_offline_hosts; reprobe_offline_hosts.delay(); "
    "from operations.models import Operation; import json; "
    "print(json.dumps([[o.pk, o.status, o.params, o.created_by_id] for o in "
    "Operation.objects.filter(kind='probe', host__name='lab-b').order_by('id')]))"
)


def _tick(stack) -> list:
    """One beat of the schedule; returns lab-b's probes so far ([id, status, params, by])."""
    return json.loads(stack.python(TICK).strip().splitlines()[-1])


def test_a_host_marked_offline_after_a_link_cut_comes_back_online_by_itself(lab_stack, lab):
    from lab import core  # noqa: F401

    alice = Api(lab_stack, lab_stack.tokens["alice"])
    status = lambda: alice.get("/api/v1/hosts/lab-b/").json()["status"]  # noqa: E731
    assert status() == "online"
    link("lab-b", up=False)
    try:
        op = run_op(alice, "POST", "/api/v1/hosts/lab-b/probe", timeout=120)
        assert op["status"] == "failure", op
        assert status() == "offline"
        # While it does not answer, the automatic probes fail and it stays offline.
        since = op["id"]  # earlier tests' probes of lab-b (and their automatic ones) do not count
        wait_for(
            lambda: [p for p in _tick(lab_stack) if p[0] > since and p[2].get("auto") and p[1] == "failure"],
            90,
            "an auto probe",
            2,
        )
        assert status() == "offline"
        probes = _tick(lab_stack)
        assert sum(1 for p in probes if p[0] > since and p[2].get("auto")) == 1, probes  # backoff: not again at once
    finally:
        link("lab-b", up=True)
    t0 = time.monotonic()

    def online():
        _tick(lab_stack)
        return status() == "online"

    wait_for(online, 120, "lab-b to come back online by itself", interval=3)
    took = time.monotonic() - t0
    probes = _tick(lab_stack)
    manual = op["id"]  # the probe that marked it offline
    after = [p for p in probes if p[0] > manual]
    assert after and all(p[2].get("auto") and p[3] is None for p in after), probes  # nobody probed it by hand
    assert after[-1][1] == "success" and all(p[1] == "failure" for p in after[:-1]), probes
    print(f"lab-b back online {took:.0f} s after its link came back")
