"""The one door from a job's SSH or agent error to its failure (hosts/handlers.py failure), used by
containers/handlers.py agent(), the probe and the migration's agent calls; and the actor the
services take instead of a request (core/audit.py Actor)."""

import pytest
from django.contrib.auth import get_user_model
from django.test import RequestFactory

from containers.handlers import agent
from core.audit import Actor, audit
from core.models import AuditEntry
from hosts import ssh
from hosts.handlers import failure
from hosts.models import Host
from operations.runner import OperationFailed


@pytest.fixture
def host(trusted_host):
    return trusted_host  # port 1 on loopback refuses at once: a real SSH attempt that fails fast


def test_an_agent_error_keeps_its_log_lines_and_data_and_leaves_the_host_as_it_is(host):
    f = failure(ssh.AgentFailed("criu dump failed", "dump.log: Error (-1)", {"ended": 1}), host, prefix="h1: ")
    assert isinstance(f, OperationFailed)
    assert (f.message, f.details, f.result) == ("h1: criu dump failed", "dump.log: Error (-1)", {"ended": 1})
    host.refresh_from_db()
    assert host.status == Host.Status.ONLINE


def test_an_unreachable_host_is_marked_offline_at_once_unless_blocked(host):
    f = failure(ssh.SSHError("h1 does not answer"), host)
    assert (f.message, f.details, f.result) == ("h1 does not answer", "", {})
    host.refresh_from_db()
    assert (host.status, host.status_message) == (Host.Status.OFFLINE, "h1 does not answer")

    Host.objects.filter(pk=host.pk).update(status=Host.Status.KEY_MISMATCH, status_message="key changed")
    failure(ssh.SSHError("h1 does not answer"), host)
    host.refresh_from_db()
    assert (host.status, host.status_message) == (Host.Status.KEY_MISMATCH, "key changed")


def test_without_a_host_the_error_only_becomes_a_failure(host):
    f = failure(ssh.SSHError("the link broke"), prefix="h1: ")
    assert f.message == "h1: the link broke"
    host.refresh_from_db()
    assert host.status == Host.Status.ONLINE


def test_a_job_whose_host_refuses_fails_with_the_sentence_and_the_host_goes_offline(host):
    """Through the real SSH client: port 1 refuses."""
    with pytest.raises(OperationFailed) as e:
        agent(None, host, "list", {})
    host.refresh_from_db()
    assert host.status == Host.Status.OFFLINE and host.status_message == e.value.message != ""


def test_the_audit_log_records_the_actor_and_the_address_of_a_request(db):
    alice = get_user_model().objects.create(username="alice")
    request = RequestFactory().post("/", REMOTE_ADDR="192.0.2.7")
    request.user = alice
    audit(Actor.of(request), "container.stop", object_type="container", object_name="c1")
    audit(Actor(alice), "container.migrate", object_type="container", object_name="c1")  # a job acting for alice
    rows = list(AuditEntry.objects.order_by("pk").values_list("user", "username", "action", "remote_addr"))
    assert rows == [
        (alice.pk, "alice", "container.stop", "192.0.2.7"),
        (alice.pk, "alice", "container.migrate", None),
    ]
