"""Onboarding a real host (issue 18 item 4): a bare lab host (sshd, python3 and apt sources,
nothing else; lab/core.py `up_bare`) is added and trusted through the API as an admin would,
prepared (kind `prepare`: apt-get over its own network, through the lab's package proxy), comes
online with the capabilities migrations need, and a running container then migrates to it and
back with its memory intact."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from tests.support.lab import PATTERN, counter, create, fingerprint, on_host, pattern
from tests.support.stack import Api, ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]


def _follow(api: Api, op_id: int, timeout: float = 600) -> list[dict]:
    """The operation's updates as its websocket streams them, until it ends."""

    async def run():
        got = []
        url = api.ws_url(f"/ws/operations/{op_id}/")
        async with websockets.connect(url, additional_headers=api.headers, open_timeout=10) as ws:
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), timeout))
                got.append(msg)
                if (msg.get("operation") or {}).get("status") in ("success", "failure", "cancelled"):
                    return got

    return asyncio.run(run())


def test_a_bare_host_is_prepared_and_a_container_migrates_to_it_and_back(lab, lab_stack, bare, bob):
    from lab import core

    alice = Api(lab_stack, lab_stack.tokens["alice"])
    name = bare["name"]
    # Nothing of ctweb's is there yet: no LXC, no CRIU, no network description.
    # (ssh hands the remote shell one string: each command here is one argument)
    assert on_host(lab, name, "command -v criu lxc-start rsync python3").stdout.split() == ["/usr/bin/python3"]
    assert on_host(lab, name, "test", "-e", "/etc/ctweb/network.json").returncode == 1

    r = alice.post("/api/v1/hosts/", json={"name": name, "address": bare["address"]})
    assert r.status_code == 201, r.text
    assert r.json()["offered_fingerprint"] == fingerprint(bare["host_key"])
    r = alice.post(f"/api/v1/hosts/{name}/trust", json={"fingerprint": fingerprint(bare["host_key"])})
    assert r.status_code == 200, r.text
    try:
        probed = ok(run_op(alice, "POST", f"/api/v1/hosts/{name}/probe"))
        assert probed["result"]["capabilities"]["criu_check"] == "not installed"

        network = {"subnet": str(core.subnet()), "bridge": core.HOST_BRIDGE, "range": list(core.CONTAINER_RANGE)}
        assert bob.post(f"/api/v1/hosts/{name}/prepare", json={"network": network}).status_code == 403

        # Where CRIU cannot work, one sentence and nothing installed: the host says Debian 12 here.
        fake = "sed 's/^VERSION_ID=.*/VERSION_ID=12/' /usr/lib/os-release > /etc/os-release.t && mv /etc/os-release.t /etc/os-release"
        assert on_host(lab, name, fake).returncode == 0
        try:
            refused = run_op(alice, "POST", f"/api/v1/hosts/{name}/prepare", {"network": network})
        finally:
            assert on_host(lab, name, "ln -sf ../usr/lib/os-release /etc/os-release").returncode == 0
        assert refused["status"] == "failure"
        assert refused["error"].startswith(f"Debian 12's CRIU 3.17 cannot run on {name}'s kernel "), refused["error"]
        assert "vdso: Unexpected rt vDSO area bounds" in refused["error"]
        assert "packages" not in [e["phase"] for e in refused["events"]]
        assert on_host(lab, name, "command -v criu lxc-start python3").stdout.split() == ["/usr/bin/python3"]

        t0 = time.monotonic()
        r = alice.post(f"/api/v1/hosts/{name}/prepare", json={"network": network})
        assert r.status_code == 202, r.text
        streamed = _follow(alice, r.json()["id"])
        took = time.monotonic() - t0
        print(f"prepare took {took:.1f}s")
        op = ok(alice.get(f"/api/v1/operations/{r.json()['id']}/").json())
        live = [m["event"] for m in streamed if m.get("type") == "operation" and m.get("event")]
        assert sum(1 for e in live if e["phase"] == "packages" and "progress" in e) > 5, live[:5]
        phases = [e["phase"] for e in op["events"]]
        for step in ("connect", "facts", "packages", "network", "check", "probe"):
            assert step in phases, phases
        assert phases.index("facts") < phases.index("packages") < phases.index("check") < phases.index("probe")
        progress = [e["progress"] for e in op["events"] if "progress" in e]
        assert progress == sorted(progress) and progress[-1] == 100 and len(progress) > 10
        result = op["result"]
        assert result["system"] == "Debian 13"
        # This kernel (6.18) needs CRIU 4.2 from sid for inet sockets; everything else is trixie's.
        assert result["packages"]["criu"].startswith("4.2") and "python3-pycriu" in result["packages"]
        assert any("TCP or UDP sockets" in e["message"] for e in op["events"])
        assert result["network"]["subnet"] == network["subnet"]

        host = alice.get(f"/api/v1/hosts/{name}/").json()
        caps = host["capabilities"]
        assert host["status"] == "online"
        assert (caps["criu_check"], caps["pycriu"], caps["uffd"]) == ("ok", True, True)
        assert caps["network"]["subnet"] == network["subnet"] and caps["network"]["bridge_present"]
        assert caps["lxc_version"] and "busybox" in caps["templates"]

        # Prepared means migration-capable: a running container goes there and back, memory intact.
        ok(create(bob, name="onboard", host="lab-a", command=["sh", "-c", PATTERN]))
        try:
            drawn, _ = pattern(lab, "lab-a", "onboard")
            for source, target in (("lab-a", name), (name, "lab-a")):
                before = counter(lab, source, "onboard")
                moved = ok(
                    run_op(
                        bob,
                        "POST",
                        "/api/v1/containers/onboard/migrate",
                        {"target_host": target, "strategy": "stop-and-copy"},
                    )
                )
                assert moved["result"]["strategy"] == "stop-and-copy"
                row = bob.get("/api/v1/containers/onboard/").json()
                assert (row["host"], row["state"]) == (target, "RUNNING")
                after = counter(lab, target, "onboard")
                assert before <= after <= before + 30, (before, after)  # went on, did not start over
                wait_for(lambda: counter(lab, target, "onboard") > after, 15, "it to go on")  # noqa: B023
                assert pattern(lab, target, "onboard") == (drawn, drawn)  # the same memory, intact
                assert "onboard" not in on_host(lab, source, "lxc-ls", "-1").stdout
        finally:
            run_op(bob, "DELETE", "/api/v1/containers/onboard/")
    finally:
        r = alice("DELETE", f"/api/v1/hosts/{name}/")
        assert r.status_code in (204, 404), r.text
