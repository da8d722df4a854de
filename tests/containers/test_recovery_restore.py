"""A restore whose agent died (or whose answer was lost) half-way through rolling the rootfs
back: its recovery finds the container not running and restores it again from the snapshot,
which still holds its whole state, instead of ending with the container stopped. The host is
a table of answers here; on the lab: tests/migration/test_e2e_lab_fault_matrix.py
(restore-agent-copy)."""

import pytest

from containers import handlers, recovery
from containers.models import Container, Snapshot
from operations.models import Operation
from operations.runner import OperationContext


@pytest.fixture
def restoring(db, trusted_host, monkeypatch):
    c = Container.objects.create(name="c1", host=trusted_host, state="STOPPING")
    Snapshot.objects.create(container=c, name="base", stateful=True)
    op = Operation.objects.create(
        kind="restore", status="running", container=c, container_name="c1", host=trusted_host,
        params={"snapshot": "base"},
    )  # fmt: skip
    calls = []

    def answers(state_before: str):
        def agent(ctx, host, sub, params, *a, **kw):
            calls.append((sub, params.get("snapshot")))
            if sub == "inspect":
                return {"exists": True, "state": state_before, "has_saved_state": False}
            if sub == "restore":
                return {"state": "RUNNING", "restored": True}
            raise AssertionError(sub)

        monkeypatch.setattr(handlers, "agent", agent)
        return calls

    return c, op, answers


def test_a_restore_cut_half_way_is_run_again_from_its_snapshot(restoring):
    c, op, answers = restoring
    calls = answers("STOPPED")
    result = recovery.recover_state_change(OperationContext(op))
    assert calls == [("inspect", None), ("restore", "base")]
    assert isinstance(result, dict) and result["restored"] is True  # the operation succeeds
    assert "run again from base" in result["recovered"]
    c.refresh_from_db()
    assert c.state == "RUNNING"


def test_a_restore_that_had_finished_is_not_run_again(restoring):
    c, op, answers = restoring
    calls = answers("RUNNING")
    result = recovery.recover_state_change(OperationContext(op))
    assert calls == [("inspect", None)]
    assert isinstance(result, str) and "RUNNING" in result
