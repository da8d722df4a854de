"""A crafted LXC config that arrives through a real migration receive (the delta of a
stop-and-copy, at the agent level) or sits in a snapshot is rewritten from the allowlist:
the dropped keys are named, CRIU still restores, no hook or net script ever runs on the
target, and an unprivileged user of the host reaches nothing of ctweb's. Needs root.

Containers use addresses .86-.87 of the lab subnet."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.criu import (  # noqa: F401 (fixtures)
    COUNTER,
    REMOTE_AGENT,
    _ssh_args,
    agent,
    counter,
    create,
    hosts,
    ok,
    ssh,
    wait_for,
)

pytestmark = [pytest.mark.lab]

MARKER = "/root/ctweb-hostile-marker"
HOOK = "/root/ctweb-hostile-hook"
EVIL = [
    f"lxc.hook.pre-start = {HOOK}",
    f"lxc.hook.start-host = {HOOK}",
    f"lxc.hook.post-stop = {HOOK}",
    f"lxc.net.0.script.up = {HOOK}",
    "lxc.include = /root/ctweb-hostile.conf",
    "lxc.mount.entry = / host-root none rbind,create=dir,optional 0 0",
    "lxc.cgroup.devices.allow = a",
    "lxc.cap.drop =",
    "lxc.apparmor.profile = unconfined",
    "lxc.console.logfile = /root/ctweb-hostile-console",
    "lxc.log.file = /root/ctweb-hostile-log",
]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _plant(lab, host):
    """The hook and the included file exist on the host: if anything ran them, the marker shows."""
    ssh(lab, host, "sh", "-c", f"rm -f {MARKER}; printf '#!/bin/sh\\ntouch {MARKER}\\n' > {HOOK}; chmod 755 {HOOK}")
    ssh(lab, host, "sh", "-c", f"echo 'lxc.hook.start = {HOOK}' > /root/ctweb-hostile.conf")


def _append_evil(lab, host, path):
    ssh(lab, host, "sh", "-c", f"cat >> {path}", input=("\n".join(EVIL) + "\n").encode())


def _relay(lab, src, dst, params):
    """send on src | receive on dst, as the dashboard relays it; the receiver's result."""
    send = subprocess.Popen(
        _ssh_args(lab, src, "python3", REMOTE_AGENT, "send"), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    recv = subprocess.Popen(
        _ssh_args(lab, dst, "python3", REMOTE_AGENT, "receive"), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    send.stdin.write((json.dumps(params) + "\n").encode())
    send.stdin.close()
    recv.stdin.write((json.dumps({**params, "stall_s": 60}) + "\n").encode())
    while chunk := send.stdout.read(1 << 16):
        recv.stdin.write(chunk)
    recv.stdin.close()
    out = recv.stdout.read().decode().splitlines()
    assert send.wait(120) == 0 and recv.wait(120) == 0, out
    lines = [json.loads(x) for x in out if x.strip()]
    assert lines[-1]["type"] == "result", lines
    return lines[-1]["data"]


def _no_host_power(lab, host, name):
    assert ssh(lab, host, "test", "-e", MARKER, check=False).returncode != 0, "a hook or script ran on the host"
    config = ssh(lab, host, "cat", f"/var/lib/lxc/{name}/config").stdout.decode()
    for bad in ("hook", "script", "include", "rbind", "devices.allow", "apparmor", "/root/", "log.file"):
        assert bad not in config, (bad, config)
    assert "lxc.cap.drop = sys_module mac_admin mac_override sys_time" in config


def _nobody_sees_nothing(lab, host, paths):
    for path in paths:
        r = ssh(lab, host, *NOBODY, "ls", "-l", path, check=False)
        assert r.returncode != 0, (path, r.stdout)


def test_a_crafted_config_in_a_migration_delta_is_dropped_and_runs_nothing(lab, hosts):  # noqa: F811
    a, b = hosts[0], hosts[1]
    name, mig = "cr-hostile", 9901
    base = {"name": name, "migration": mig}
    _plant(lab, b)
    create(lab, a, name, 86, command=["sh", "-c", COUNTER])
    try:
        assert wait_for(lambda: counter(lab, a, name) > 3)
        ok(lab, a, "migrate-prepare", base)
        ok(lab, b, "migrate-check", {**base, "need_bytes": 0, "bridge": "lxcbr0"})
        _relay(lab, a, b, {**base, "what": "rootfs"})
        ok(lab, a, "migrate-dump", {**base, "lazy": False})
        # The source's config turns hostile before the delta leaves: the target must not care.
        _append_evil(lab, a, f"/var/lib/lxc/{name}/config")
        got = _relay(lab, a, b, {**base, "what": "delta"})
        for key in (
            "lxc.hook.pre-start",
            "lxc.net.0.script.up",
            "lxc.include",
            "lxc.cgroup.devices.allow",
            "lxc.cap.drop",
            "lxc.apparmor.profile",
            "lxc.console.logfile",
            "lxc.log.file",
        ):
            assert any(d.startswith(key) for d in got["config_dropped"]), (key, got)
        assert any(d.startswith("lxc.mount.entry") for d in got["config_dropped"])
        # During the migration, the images and the received copy are the host's root's only.
        _nobody_sees_nothing(lab, a, ["/var/lib/ctweb", f"/var/lib/ctweb/migrations/{mig}/images"])
        _relay(lab, a, b, {**base, "what": "images"})
        _nobody_sees_nothing(lab, b, ["/var/lib/ctweb", f"/var/lib/ctweb/migrations/{mig}"])
        ok(lab, b, "migrate-restore", {**base, "lazy": False})
        before = counter(lab, b, name)
        assert wait_for(lambda: counter(lab, b, name) > before + 2), "the restored counter does not go on"
        _no_host_power(lab, b, name)
        ok(lab, b, "stop", {"name": name})
        ok(lab, b, "start", {"name": name})  # a cold start with the rewritten config: still no hook
        _no_host_power(lab, b, name)
    finally:
        for h in (a, b):
            agent(lab, h, "delete", {"name": name})
            agent(lab, h, "migrate-cleanup", {**base, "remove": False})


def test_a_crafted_snapshot_config_is_dropped_at_restore_and_the_copy_is_private(lab, hosts):  # noqa: F811
    a = hosts[0]
    name = "cr-hostsnap"
    _plant(lab, a)
    create(lab, a, name, 87, command=["sh", "-c", COUNTER])
    try:
        assert wait_for(lambda: counter(lab, a, name) > 3)
        # a setuid binary inside the container: no local user may reach its snapshot copy
        ssh(
            lab,
            a,
            "sh",
            "-c",
            f"cp /var/lib/lxc/{name}/rootfs/bin/busybox /var/lib/lxc/{name}/rootfs/suid && "
            f"chmod 4755 /var/lib/lxc/{name}/rootfs/suid",
        )
        ok(lab, a, "snapshot", {"name": name, "snapshot": "s1"})
        sdir = f"/var/lib/ctweb/snapshots/{name}/s1"
        _nobody_sees_nothing(lab, a, ["/var/lib/ctweb", "/var/lib/ctweb/snapshots", sdir, f"{sdir}/rootfs/suid"])
        r = ssh(lab, a, *NOBODY, f"{sdir}/rootfs/suid", "true", check=False)
        assert r.returncode != 0
        _append_evil(lab, a, f"{sdir}/config")  # as if it had come from another host
        events, final = agent(lab, a, "restore", {"name": name, "snapshot": "s1"})
        assert final["type"] == "result", final
        assert "lxc.hook.pre-start" in final["data"]["config_dropped"]
        assert any(e["phase"] == "config" and "lxc.include" in e["message"] for e in events)
        before = counter(lab, a, name)
        assert wait_for(lambda: counter(lab, a, name) > before + 2)
        _no_host_power(lab, a, name)
    finally:
        agent(lab, a, "delete", {"name": name})
