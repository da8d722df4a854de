"""The worker's SSH connection pool, against a real OpenSSH server on loopback."""

import pytest

from hosts import ssh
from hosts.models import Host
from tests.support.helpers import sshd_host

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(db, settings, tmp_path):
    with sshd_host(settings, tmp_path, "pooled") as (srv, host):
        yield srv, host


def logins(srv) -> int:
    return (srv.dir / "sshd.log").read_text().count("Accepted publickey")


def test_a_connection_is_reused_and_never_shared_between_two_jobs(server):
    srv, host = server
    with ssh.pooled(host) as first:
        with ssh.pooled(host) as second:  # a second job at the same time gets its own
            assert second is not first
    with ssh.pooled(host) as again:
        assert again in (first, second)
    assert logins(srv) == 2


def test_a_dead_connection_is_replaced_and_an_error_is_never_pooled(server):
    srv, host = server
    with ssh.pooled(host) as conn:
        pass
    conn.client.get_transport().close()  # the link died while it was idle
    with ssh.pooled(host) as fresh:
        assert fresh is not conn
    with pytest.raises(RuntimeError), ssh.pooled(host) as failed:
        raise RuntimeError("the job failed")
    with ssh.pooled(host) as after:
        assert after is not failed
    assert logins(srv) == 3


def test_a_new_pinned_key_is_never_served_an_old_connection(server):
    srv, host = server
    with ssh.pooled(host) as conn:
        pass
    assert ssh._alive(conn)  # idle and alive in the pool
    # An admin pins another key: the live connection made under the old one is not reused.
    other = "AAAAC3NzaC1lZDI1NTE5AAAAIGbXYqIV8bzRLxNfJ6vHR5cP2xvQ6QFqD7PbSqPXW0Mg"
    Host.objects.filter(pk=host.pk).update(key_data=other)
    host.refresh_from_db()
    with pytest.raises(ssh.HostKeyMismatch), ssh.pooled(host):
        pass
    assert ssh._pool.get(host.pk) == []


def test_an_agents_lines_that_are_not_json_objects_are_skipped_not_obeyed():
    """A host that lies prints a JSON list, a string or garbage where the agent prints objects:
    every reader of agent lines (run_agent, an import's upload, the relays) skips such a line.
    run_agent read `.get` on whatever JSON came and crashed on a list before the readers shared
    ssh._messages."""
    from hosts import ssh

    lines = [b"[1, 2]", b'"result"', b"not json", b'{"type": "event", "progress": 5}',
             b'{"type": "result", "data": {"ok": true}}', b"null"]  # fmt: skip
    seen = []
    result, error, at = ssh._outcome(ssh._messages(lines, host="h1"), seen.append)
    assert result == {"ok": True} and error is None and at > 0
    assert seen == [{"type": "event", "progress": 5}]
