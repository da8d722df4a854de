"""A post-copy's read-ahead (hosts/agent/ctweb_agent/prefetch.py) with the real CRIU on both
ends, relayed and host to host: the target's relay asks the source's page server for the
pages ahead of CRIU's lazy-pages daemon and answers CRIU from them. A debian container holding
96 MiB of a pattern, which it reads through every second (faults in the middle of the pull),
moves to lab-b; the pattern is whole there, the container goes on, and the relay's counters
say the read-ahead brought the pages (not CRIU's own requests) and refused nothing."""

import pytest

from lab import core
from tests.support.criu import memcheck
from tests.support.lab import create, on_host
from tests.support.stack import Api, ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

NAME = "readahead"
MIB = 96


def tick(lab, host: str) -> int:
    r = on_host(lab, host, "cat", f"/var/lib/lxc/{NAME}/rootfs/tmp/memcheck")
    words = r.stdout.split()
    assert not words or words[0] == "OK", r.stdout  # its memory changed: a page came wrong
    return int(words[1]) if words else 0


@pytest.mark.parametrize("path", ["ssh-relay", "direct-tls"])
def test_the_read_ahead_brings_the_pages_and_the_memory_arrives_whole(bob, lab, lab_stack, path):
    alice = Api(lab_stack, lab_stack.tokens["alice"])
    if path == "direct-tls":
        r = alice("PUT", "/api/v1/settings/", json={"direct_transfer_networks": [str(core.subnet())]})
        assert r.status_code == 200, r.text
    ok(create(bob, name=NAME, host="lab-a", template="debian", command=["python3", "-c", memcheck(MIB)]))
    try:
        wait_for(lambda: tick(lab, "lab-a") >= 2, 60, "the pattern checked twice")
        op = ok(
            run_op(
                bob,
                "POST",
                f"/api/v1/containers/{NAME}/migrate",
                {"target_host": "lab-b", "strategy": "post-copy"},
                timeout=300,
            )
        )
        result = op["result"]
        assert result["page_relay"]["path"] == path, result["page_relay"]
        ahead = result["page_relay"]["relay"]["read_ahead"]
        print(f"\n{path}: {result['page_bytes'] / 2**20:.1f} MiB in {result['pages_ms']} ms, read-ahead {ahead}")
        assert ahead["error"] is None, ahead
        # The pattern's pages came because the relay asked ahead; CRIU's own requests (its
        # faults, and what it wanted before any read-ahead) brought a small part.
        # (The counters are the relay's last status, written twice a second: "given", what CRIU
        # took, may lag its end; what was asked ahead was asked early in the pull.)
        assert ahead["read_ahead_bytes"] >= 0.8 * MIB * 2**20, ahead
        assert ahead["faults"] < ahead["asked"], ahead
        before = tick(lab, "lab-b")
        wait_for(lambda: tick(lab, "lab-b") >= before + 2, 30, "the pattern checked again on lab-b")
        assert NAME not in on_host(lab, "lab-a", "lxc-ls", "-1").stdout.split()
    finally:
        if path == "direct-tls":
            alice("PUT", "/api/v1/settings/", json={"direct_transfer_networks": []})
        run_op(bob, "DELETE", f"/api/v1/containers/{NAME}/")
