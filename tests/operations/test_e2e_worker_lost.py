"""A worker that dies mid-job: the next worker to start fails the job, never leaving it running."""

import socket
import threading

import pytest

from tests.support.stack import Api, wait_for

pytestmark = pytest.mark.e2e


class Tarpit:
    """A TCP peer that accepts connections and then never speaks (a hung host),
    or with `hangup=True` says one line and closes (a host that vanishes)."""

    def __init__(self, hangup: bool = False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.hangup = hangup
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.hangup:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                conn.close()
            else:
                self.conns.append(conn)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def _trusted_host(stack, name: str, port: int) -> None:
    # A host already trusted (any key will do: the connection never gets that far).
    stack.python(
        "from hosts.models import Host\n"
        f"Host.objects.create(name='{name}', address='127.0.0.1', port={port}, status='trusted',"
        " key_type='ssh-ed25519', key_data='AAAAC3NzaC1lZDI1NTE5AAAAIGbXYqIV8bzRLxNfJ6vHR5cP2xvQ6QFqD7PbSqPXW0Mg',"
        " fingerprint='SHA256:test')"
    )


def test_it_fails_the_operation_of_a_lost_worker(stack):
    pit = Tarpit()
    try:
        _trusted_host(stack, "hung", pit.port)
        admin = Api(stack, stack.tokens["alice"])
        op_id = admin.post("/api/v1/hosts/hung/probe").json()["id"]
        wait_for(lambda: admin.get(f"/api/v1/operations/{op_id}/").json()["status"] == "running", 10, "running")

        stack.procs["worker"].kill()
        assert admin.get(f"/api/v1/operations/{op_id}/").json()["status"] == "running"
        stack.start_worker()

        op = admin.wait_operation(op_id, timeout=30)
        assert op["status"] == "failure"
        assert op["error"].startswith("Worker lost")
        assert op["finished_at"]
    finally:
        pit.close()


def test_it_reports_a_host_that_hangs_up_mid_handshake(stack):
    pit = Tarpit(hangup=True)
    try:
        _trusted_host(stack, "vanishing", pit.port)
        admin = Api(stack, stack.tokens["alice"])
        op = admin.wait_operation(admin.post("/api/v1/hosts/vanishing/probe").json()["id"])
        assert op["status"] == "failure"
        assert "Cannot connect to vanishing" in op["error"]
        host = admin.get("/api/v1/hosts/vanishing/").json()
        assert host["status"] == "offline"
        assert host["capabilities"] == {}
    finally:
        pit.close()


# The worker and beat say so while Redis is down (celery's consumer, beat's sender).
@pytest.mark.stack_errors(r"Cannot connect to redis", r"beat: Connection error", r"Connection to Redis lost")
def test_an_operation_survives_a_redis_restart_and_new_ones_work_after(stack, sshd):
    from tests.support.stack import Process

    admin = Api(stack, stack.tokens["alice"])
    admin.post("/api/v1/hosts/", json={"name": "redis-restart", "address": "127.0.0.1", "port": sshd.port})
    admin.post("/api/v1/hosts/redis-restart/trust", json={"fingerprint": sshd.fingerprint()})
    pit = Tarpit()  # a second, hung host keeps one operation running across the restart
    try:
        _trusted_host(stack, "slow", pit.port)
        slow = admin.post("/api/v1/hosts/slow/probe").json()["id"]
        wait_for(lambda: admin.get(f"/api/v1/operations/{slow}/").json()["status"] == "running", 10, "running")

        redis = stack.procs["redis"]
        redis.stop()
        stack.procs["redis"] = Process("redis", redis.argv, redis.env, redis.log).start()
        wait_for(lambda: (stack.dir / "redis.sock").exists(), 10, "redis back")

        op = admin.wait_operation(slow, timeout=60)  # the row, not Redis, is the truth
        assert op["status"] == "failure" and "Cannot connect to slow" in op["error"]
        after = admin.wait_operation(admin.post("/api/v1/hosts/redis-restart/probe").json()["id"], timeout=90)
        assert after["status"] == "success", after["error"]
    finally:
        pit.close()
