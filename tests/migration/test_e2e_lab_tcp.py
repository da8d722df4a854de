"""A TCP connection from outside a container to a service inside it survives the container's
live migration (CRIU's established-TCP support), on the real lab."""

import socket

import pytest

from tests.support.lab import create
from tests.support.stack import ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

# An echo service: every connection is served until its client closes it.
ECHO = (
    "import socket, threading\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 7000)); s.listen()\n"
    "def serve(c):\n"
    "    while True:\n"
    "        data = c.recv(4096)\n"
    "        if not data: break\n"
    "        c.sendall(data)\n"
    "    c.close()\n"
    "while True:\n"
    "    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()\n"
)


def echo(sock: socket.socket, msg: bytes) -> bytes:
    sock.sendall(msg)
    got = b""
    while len(got) < len(msg):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.parametrize("strategy", ["stop-and-copy", "post-copy"])
def test_a_clients_tcp_connection_survives_live_migration(bob, lab, strategy):
    name = "tcp-" + strategy.split("-")[0]
    ok(create(bob, name=name, host="lab-a", template="debian", command=["python3", "-c", ECHO]))
    sock = None
    try:
        ip = bob.get(f"/api/v1/containers/{name}/").json()["ipv4"]
        sock = wait_for(lambda: socket.create_connection((ip, 7000), timeout=2), 30, "the echo service")
        sock.settimeout(60)
        assert echo(sock, b"before the move\n") == b"before the move\n"
        for target in ("lab-b", "lab-a"):
            op = ok(
                run_op(bob, "POST", f"/api/v1/containers/{name}/migrate", {"target_host": target, "strategy": strategy})
            )
            assert op["result"]["strategy"] == strategy
            row = bob.get(f"/api/v1/containers/{name}/").json()
            assert (row["host"], row["state"], row["ipv4"]) == (target, "RUNNING", ip)
            # The same connection, opened before the move, carries on.
            msg = f"after moving to {target}\n".encode()
            assert echo(sock, msg) == msg
        # And the address still takes new connections.
        with socket.create_connection((ip, 7000), timeout=5) as fresh:
            assert echo(fresh, b"new\n") == b"new\n"
    finally:
        if sock is not None:
            sock.close()
        run_op(bob, "DELETE", f"/api/v1/containers/{name}/")
