"""The page pull's own logic (containers/migration/postcopy.py pull_pages) with the hosts replaced by
a table of answers and a fake clock: no limit on the pull's total time while pages move,
and a pull that stops moving for the admin-set stall limit waits for an admin's decision
with the exact actions (nothing removed), instead of ending failed with a sentence.
The real thing on the lab: tests/migration/test_e2e_lab_postcopy_faults.py."""

import re

import pytest

from containers import migration
from containers.migration import postcopy
from containers.migration.phases import FINISH_PULL, Progress
from containers.models import Container
from hosts import ssh
from hosts.models import Host
from operations.models import Operation
from operations.runner import KEEP_WAITING, OperationContext, WaitFor


class Clock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.now += s


class Conn:
    """A host's connection: each migrate-lazy-wait takes its wait_s on the fake clock."""

    client = type("Client", (), {"get_transport": lambda self: None})()

    def __init__(self, host, clock, answer):
        self.host, self.clock, self.answer = host, clock, answer

    def run_agent(self, sub, params, timeout=None, on_event=None):
        assert sub == "migrate-lazy-wait"
        self.clock.now += params["wait_s"]
        a = self.answer(params["role"])
        if isinstance(a, Exception):
            raise a
        return ssh.AgentResult(a, "", 0)

    def close(self):
        pass


class Pump:
    last_progress = 0.0
    bytes_down = rounds = 0
    errors: list = []

    def stop(self):
        pass


@pytest.fixture
def pull(db, trusted_host, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(postcopy, "time", clock)
    monkeypatch.setattr(postcopy, "stall_limit_s", lambda: 60.0)
    target = Host.objects.create(name="h2", address="127.0.0.2", port=1, status="online", key_data="x")
    c = Container.objects.create(name="c1", host=target, state="RUNNING")
    op = Operation.objects.create(
        kind="migrate",
        container=c,
        container_name="c1",
        host=trusted_host,
        target_host=target,
        params={"strategy": "post-copy"},
        result={"frozen_at": "2026-12-01T04:05:06+00:00", "stopping": True},
    )
    ctx = OperationContext(op)

    def run(answer):
        monkeypatch.setattr(ssh, "_open", lambda host, timeout=None: Conn(host, clock, answer))  # a reconnect
        src, dst = Conn(trusted_host, clock, answer), Conn(target, clock, answer)
        return migration.pull_pages(
            Progress(ctx, FINISH_PULL), src, dst, c, {"name": "c1", "migration": op.pk}, Pump(), {}
        )

    run.clock = clock
    return run


def test_a_pull_that_keeps_moving_has_no_limit_of_time(pull):
    calls = {"n": 0}

    def answer(role):
        if role == "source":
            return {"done": True, "stats": {"pages": 1}}
        calls["n"] += 1
        if calls["n"] > 2000:  # about 2.8 hours of pulling, 5 s a call
            return {"done": True, "relay": {}}
        return {"done": False, "relay": {"from_peer": calls["n"], "from_criu": calls["n"]}}

    out, stats, *_ = pull(answer)
    assert out["done"] and stats == {"pages": 1}
    assert pull.clock.now - 1000 > 10000


def test_a_pull_without_progress_for_the_stall_limit_waits_for_an_admin_with_the_actions(pull):
    def answer(role):
        return ssh.SSHError("Cannot connect to h2")

    with pytest.raises(WaitFor) as e:
        pull(answer)
    assert 60 < pull.clock.now - 1000 < 90
    wait = e.value
    assert "h2 cannot be reached" in wait.sentence and "nothing was removed" in wait.sentence
    assert [a["id"] for a in wait.actions] == [migration.POSTCOPY_RESUME, KEEP_WAITING]
    resume = wait.actions[0]
    assert resume["label"] == "Resume on h1 from the state of 04:05:06 UTC"
    assert "what ran on h2 since is lost" in resume["consequence"]
    assert re.search(r"stopped and removed when h2 answers again", resume["consequence"])
    assert migration.MIGRATION_ACTIONS[migration.POSTCOPY_RESUME] is migration.lazy_resume_decision
