"""Configs from an allowlist: a hostile LXC config that arrives with a migration (or a
snapshot) keeps none of its host-side power (real files in temp dirs; the lab tests run
the same code on real hosts)."""

import json
import os
import stat

import pytest

from tests.support.agent import make_tar, receive  # noqa: F401

HOSTILE = [
    "lxc.hook.pre-start = /bin/sh -c 'touch /tmp/owned'",
    "lxc.net.0.script.up = /tmp/evil-up",
    "lxc.include = /etc/evil.conf",
    "lxc.mount.entry = / host none rbind,create=dir 0 0",
    "lxc.mount.entry = /etc etc-host none bind 0 0",
    "lxc.cgroup2.devices.allow = a",
    "lxc.cgroup.devices.allow = a",
    "lxc.cap.drop =",
    "lxc.apparmor.profile = unconfined",
    "lxc.seccomp.profile = /etc/evil.seccomp",
    "lxc.console.logfile = /etc/cron.d/evil",
    "lxc.log.file = /etc/cron.d/evil2",
    "lxc.rootfs.path = dir:/",
    "lxc.mount.auto = proc:rw sys:rw cgroup:rw",
    "lxc.namespace.keep = net",
    "lxc.sysctl.kernel.core_pattern = |/tmp/evil",
    "lxc.prlimit.memlock = unlimited",
    "lxc.start.auto = 1",
    "lxc.net.0.type = phys",
    "lxc.net.0.link = eth0",
    "lxc.uts.name = someone-else",
]
DANGEROUS_KEYS = [line.partition("=")[0].strip() for line in HOSTILE]
BENIGN = [
    "lxc.signal.halt = SIGUSR1",
    "lxc.tty.max = 0",
    "lxc.pty.max = 1",
    "lxc.environment = GREETING=hello",
    "lxc.init.cmd = /ctweb/init",
    "lxc.mount.entry = shm dev/shm tmpfs defaults,create=dir 0 0",
    "lxc.cap.drop = sys_rawio",
]


def _config_of(path):
    return open(path).read().splitlines()


def _keys(lines):
    return [ln.partition("=")[0].strip() for ln in lines if "=" in ln and not ln.startswith("#")]


def _events(capsys):
    out = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    return [e for e in out if e.get("type") == "event"]


def test_a_hostile_received_config_keeps_no_host_power(agent, monkeypatch, tmp_path, capsys):  # noqa: F811
    monkeypatch.setattr(agent.lxc, "_host_network", lambda: {"bridge": "lxcbr0", "subnet": "10.9.0.0/24"})
    cfg = "\n".join(BENIGN + HOSTILE + ["lxc.net.0.ipv4.address = 10.9.0.5/24"]).encode()
    res = receive(
        agent, monkeypatch, make_tar([("c1", "dir", b""), ("c1/rootfs", "dir", b""), ("c1/config", "f", cfg)])
    )
    written = _config_of(os.path.join(agent.S.LXC_PATH, "c1", "config"))
    text = "\n".join(written)
    for bad in (
        "hook",
        "script",
        "include",
        "devices.allow",
        "apparmor",
        "seccomp",
        "/etc/",
        "log.file",
        "namespace",
        "sysctl",
        "prlimit",
        "start.auto",
        "rbind",
        " bind",
        "phys",
        "someone-else",
        "rw",
    ):
        assert bad not in text, (bad, written)
    assert f"lxc.rootfs.path = dir:{agent.S.LXC_PATH}/c1/rootfs" in written
    assert "lxc.uts.name = c1" in written
    assert "lxc.cap.drop = sys_module mac_admin mac_override sys_time sys_rawio" in written
    assert f"lxc.console.logfile = {agent.S.LXC_PATH}/c1/console.log" in written
    for line in BENIGN[:-1]:
        assert line in written
    # a phys NIC is not this host's bridge: no network rather than a host interface
    assert "lxc.net.0.type = empty" in written
    dropped = res["config_dropped"]
    for key in DANGEROUS_KEYS:
        assert any(d.startswith(key) for d in dropped), (key, dropped)
    events = [e for e in _events(capsys) if e["phase"] == "config"]
    assert events and "lxc.hook.pre-start" in events[0]["message"]
    assert stat.S_IMODE(os.stat(os.path.join(agent.S.LXC_PATH, "c1", "config")).st_mode) == 0o600


def test_the_network_is_this_hosts_own(agent, monkeypatch):  # noqa: F811
    monkeypatch.setattr(agent.lxc, "_host_network", lambda: {"bridge": "lxcbr0", "subnet": "10.9.0.0/24"})
    lines = ["lxc.net.0.type = veth", "lxc.net.0.link = lxcbr0", "lxc.net.0.ipv4.address = 10.9.0.7/24"]
    out, dropped = agent._allowlisted("c1", lines)
    assert "lxc.net.0.ipv4.address = 10.9.0.7/24" in out and "lxc.net.0.link = lxcbr0" in out
    assert dropped == []
    out, dropped = agent._allowlisted(
        "c1", ["lxc.net.0.type = veth", "lxc.net.0.link = mgmt0", "lxc.net.0.ipv4.address = 192.168.1.9/24"]
    )
    assert "lxc.net.0.type = empty" in out and "lxc.net.0.link" in dropped


def test_snapshot_configs_are_rewritten_on_receive(agent, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(agent.lxc, "_host_network", lambda: {})
    cfg = "\n".join(HOSTILE).encode()
    members = [("c1", "dir", b""), ("c1/s1", "dir", b""), ("c1/s1/config", "f", cfg), ("c1/s1/rootfs", "dir", b"")]
    res = receive(agent, monkeypatch, make_tar(members), what="snapshots")
    written = _config_of(os.path.join(agent.S.SNAPSHOTS_PATH, "c1", "s1", "config"))
    assert not any(k in _keys(written) for k in ("lxc.hook.pre-start", "lxc.include", "lxc.cgroup2.devices.allow"))
    assert "lxc.hook.pre-start" in res["config_dropped"]["s1"]


def test_a_planted_config_tmp_symlink_is_never_followed(agent, tmp_path):  # noqa: F811
    cdir = os.path.join(agent.S.LXC_PATH, "c1")
    os.makedirs(os.path.join(cdir, "rootfs"))
    victim = tmp_path / "cron-file"
    victim.write_text("host\n")
    os.symlink(str(victim), os.path.join(cdir, "config.tmp"))
    with pytest.raises(agent.AgentError):
        agent._write_config("c1", ["lxc.uts.name = c1"])
    assert victim.read_text() == "host\n"
    os.unlink(os.path.join(cdir, "config.tmp"))
    open(os.path.join(cdir, "config.tmp"), "w").write("stale")  # a stale plain tmp is replaced
    os.symlink(str(victim), os.path.join(cdir, "config"))  # a symlink as config is replaced, not followed
    agent._write_config("c1", ["lxc.uts.name = c1"])
    assert victim.read_text() == "host\n"
    assert not os.path.islink(os.path.join(cdir, "config"))
    assert _config_of(os.path.join(cdir, "config")) == ["lxc.uts.name = c1"]


def test_private_modes_fix_an_older_layout(agent, tmp_path):  # noqa: F811
    ctweb = agent.S.CTWEB_PATH
    for d in ("snapshots/c1/s1/rootfs", "state/c1", "migrations/3", "locks", "bundles"):
        os.makedirs(os.path.join(ctweb, d), mode=0o755)
    for d in ("", "snapshots", "snapshots/c1", "snapshots/c1/s1", "state", "state/c1", "migrations", "migrations/3"):
        os.chmod(os.path.join(ctweb, d), 0o755)
    open(os.path.join(ctweb, "bundles", "op-1.tar.gz"), "w").close()
    os.chmod(os.path.join(ctweb, "bundles", "op-1.tar.gz"), 0o644)
    os.chmod(os.path.join(ctweb, "snapshots/c1/s1/rootfs"), 0o755)
    agent.S.LOCKS_PATH = os.path.join(ctweb, "locks")
    agent.S.BUNDLES_PATH = os.path.join(ctweb, "bundles")
    agent._private_modes()
    for d in ("", "snapshots", "snapshots/c1", "snapshots/c1/s1", "state", "state/c1", "migrations/3", "bundles"):
        assert stat.S_IMODE(os.stat(os.path.join(ctweb, d)).st_mode) == 0o700, d
    assert stat.S_IMODE(os.stat(os.path.join(ctweb, "bundles", "op-1.tar.gz")).st_mode) == 0o600
    # never inside a rootfs copy
    assert stat.S_IMODE(os.stat(os.path.join(ctweb, "snapshots/c1/s1/rootfs")).st_mode) == 0o755


def test_a_config_ctweb_made_earlier_has_no_warnings(agent, monkeypatch):  # noqa: F811
    # lxc-create -t busybox on a lab host, then the older _configure: nothing outside the allowlist.
    monkeypatch.setattr(agent.lxc, "_host_network", lambda: {"bridge": "lxcbr0", "subnet": "10.77.64.0/24"})
    cdir = f"{agent.S.LXC_PATH}/c1"
    lines = [
        "# Template used to create this container: /usr/share/lxc/templates/lxc-busybox",
        "#lxc.include = /usr/share/lxc/config/nesting.conf",
        f"lxc.rootfs.path = dir:{cdir}/rootfs",
        "lxc.signal.halt = SIGUSR1",
        "lxc.signal.reboot = SIGTERM",
        'lxc.uts.name = "c1"',
        "lxc.autodev = 1",
        "lxc.tty.max = 0",
        "lxc.pty.max = 1",
        "lxc.cap.drop = sys_module mac_admin mac_override sys_time",
        "lxc.mount.auto = cgroup:mixed proc:mixed sys:ro",
        "lxc.mount.entry = shm dev/shm tmpfs defaults,create=dir 0 0",
        "lxc.mount.entry = mqueue dev/mqueue mqueue defaults,optional,create=dir 0 0",
        "# ctweb template=busybox",
        f"lxc.console.logfile = {cdir}/console.log",
        "lxc.net.0.type = veth",
        "lxc.net.0.link = lxcbr0",
        "lxc.net.0.flags = up",
        "lxc.net.0.name = eth0",
        "lxc.net.0.hwaddr = 02:c7:0a:4d:40:65",
        "lxc.net.0.ipv4.address = 10.77.64.101/24",
        "lxc.init.cmd = /ctweb/init",
    ]
    out, dropped = agent._allowlisted("c1", lines)
    assert dropped == []
    # what CRIU's restore needs is all still there
    for line in lines[2:]:
        if line.startswith("lxc.") and "uts.name" not in line:
            assert line in out, line
    assert agent._allowlisted("c1", out) == (out, [])  # a fixed point
