"""The recovery of a post-copy that stopped mid-pull (asked again after a wait, "keep
waiting", or a lost worker), with the hosts replaced by a table of answers: a target that
does not answer is never taken for gone (the operation waits with the admin's actions,
nothing removed); a target that answers without a running copy (its host crashed and came
back) gives the container back to the source's frozen tasks, and the record follows."""

from contextlib import contextmanager

import pytest

from containers import migration
from containers.migration.recovery import recover_migration
from containers.models import Container
from hosts import ssh
from hosts.models import Host
from operations.models import Operation
from operations.runner import KEEP_WAITING, OperationContext, WaitFor

FROZEN = {
    "exists": True,
    "state": "FROZEN",
    "migration": {"lazy_dump": True, "lazy_dump_running": True, "received": False, "lazy_pages_running": False},
}


@pytest.fixture
def world(db, trusted_host, monkeypatch):
    target = Host.objects.create(name="h2", address="127.0.0.2", port=1, status="online", key_data="x")
    c = Container.objects.create(name="c1", host=target, state="RUNNING")  # the record followed the restore
    op = Operation.objects.create(
        kind="migrate",
        status="running",
        container=c,
        container_name="c1",
        host=trusted_host,
        target_host=target,
        params={"strategy": "post-copy"},
        result={"frozen_at": "2026-12-01T04:05:06+00:00", "stopping": True, "was_running": True},
    )
    calls = []

    def hosts(answers: dict):
        class Conn:
            def __init__(self, host):
                self.host = host

            def run_agent(self, sub, params, on_event=None, timeout=None):
                calls.append((self.host.name, sub))
                if sub == "inspect":
                    return ssh.AgentResult(answers[self.host.name], "", 0)
                if sub == "migrate-resume":
                    return ssh.AgentResult({"state": "RUNNING"}, "", 0)
                return ssh.AgentResult({}, "", 0)

        @contextmanager
        def connect(host, timeout=None):
            if answers.get(host.name) is None:
                raise ssh.SSHError(f"Cannot connect to {host.name}")
            yield Conn(host)

        monkeypatch.setattr(ssh, "connect", connect)
        return calls

    return trusted_host, target, c, op, hosts


def test_a_target_that_does_not_answer_makes_it_wait_with_the_actions_and_nothing_removed(world):
    source, target, c, op, hosts = world
    calls = hosts({"h1": FROZEN, "h2": None})
    with pytest.raises(WaitFor) as e:
        recover_migration(OperationContext(op))
    assert [a["id"] for a in e.value.actions] == [migration.POSTCOPY_RESUME, KEEP_WAITING]
    assert "nothing was removed" in e.value.sentence
    assert calls == [("h1", "inspect")]  # asked, nothing resumed, aborted or cleaned
    assert Container.objects.get(pk=c.pk).host == target


def test_a_target_back_without_a_running_copy_gives_the_container_back_to_the_source(world):
    source, target, c, op, hosts = world
    stopped = {"exists": True, "state": "STOPPED", "migration": {"received": True, "lazy_pages_running": False}}
    calls = hosts({"h1": FROZEN, "h2": stopped})
    outcome = recover_migration(OperationContext(op))
    assert ("h2", "migrate-abort") in calls and ("h1", "migrate-resume") in calls
    assert calls.index(("h2", "migrate-abort")) < calls.index(("h1", "migrate-resume"))  # never two copies
    c.refresh_from_db()
    assert (c.host, c.state) == (source, "RUNNING"), outcome
    assert "resumed on h1" in outcome


def test_with_both_hosts_unreachable_the_decision_stays_on_offer(world):
    source, target, c, op, hosts = world
    calls = hosts({"h1": None, "h2": None})
    with pytest.raises(WaitFor) as e:
        recover_migration(OperationContext(op))
    assert [a["id"] for a in e.value.actions] == [migration.POSTCOPY_RESUME, KEEP_WAITING]
    assert calls == [] and Container.objects.get(pk=c.pk).host == target
