"""The lab for real: namespaces, sshd, LXC and CRIU inside lab hosts.  Needs root.

Run: python3 -m pytest -m lab tests/lab -v   (the first run builds the rootfs cache)
No Django here on purpose.  One test brings a second lab instance up beside the session's
and checks that its down() leaves no trace.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import core
from tests.conftest import LAB_HOSTS as N_HOSTS
from tests.support.criu import _ssh_args

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]


def _net_ip(octet: int) -> str:
    # Tests here use .90-.99 with random MACs: below the dashboard's range (.100-), so the
    # root namespace never holds a stale ARP entry for an address the dashboard hands out.
    return str(core.subnet().network_address + octet)


def ssh(lab, host: dict, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    args = _ssh_args(lab, host, *cmd)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} on {host['name']} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def copy(lab, src: dict, dst: dict, *paths: str) -> None:
    """tar paths (relative to /) from one host to another through the root namespace."""
    send = subprocess.Popen(_ssh_args(lab, src, "tar", "-C", "/", "-cf", "-", *paths), stdout=subprocess.PIPE)
    recv = subprocess.run(_ssh_args(lab, dst, "tar", "-C", "/", "-xf", "-"), stdin=send.stdout, capture_output=True)
    send.stdout.close()
    assert send.wait(60) == 0 and recv.returncode == 0, recv.stderr


def ping_from_root(addr: str) -> bool:
    return subprocess.run(["ping", "-c", "1", "-W", "2", addr], capture_output=True).returncode == 0


def wait_for(pred, timeout: float = 15.0, step: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def test_it_returns_one_entry_per_host(lab):
    hosts = lab["hosts"]
    assert [h["name"] for h in hosts] == ["lab-a", "lab-b"]
    assert [h["address"] for h in hosts] == [_net_ip(11), _net_ip(12)]
    for h in hosts:
        assert h["port"] == 22 and h["username"] == "root"
        assert h["host_key"].startswith("ssh-ed25519 AAAA") and len(h["host_key"].split()) == 2
        assert Path(f"/proc/{h['pid']}").exists()
    assert hosts[0]["host_key"] != hosts[1]["host_key"]


def test_it_is_idempotent(lab):
    t0 = time.monotonic()
    again = core.up(N_HOSTS, lab["pubkey"])
    print(f"\nsecond up in {time.monotonic() - t0:.2f}s")
    assert again == lab["hosts"]


def test_it_reports_status(lab):
    rows = core.status()
    assert [r["name"] for r in rows] == ["lab-a", "lab-b"]
    assert all(r["running"] and r["sshd"].startswith("SSH-2.0") for r in rows)


def test_it_runs_criu_check_over_ssh(lab):
    out = ssh(lab, lab["hosts"][0], "criu", "check")
    assert "Looks good" in out.stdout + out.stderr
    assert ssh(lab, lab["hosts"][1], "hostname").stdout.strip() == "lab-b"


def test_it_isolates_hosts(lab):
    a, b = lab["hosts"]
    out = ssh(
        lab,
        a,
        "sh",
        "-c",
        "echo $$; ls /var/lib/ctweb/templates/debian/rootfs/usr/bin/python3; ip -4 -o addr show dev eth0",
    )
    pid_in_ns, py, addr = out.stdout.split("\n", 2)
    assert py.endswith("python3") and a["address"] in addr
    # the host's /proc shows its own pid namespace only: init is pid 1
    assert ssh(lab, a, "cat", "/proc/1/cmdline").stdout.startswith("/usr/bin/python3")
    # no route anywhere but the lab subnet
    routes = ssh(lab, b, "ip", "-4", "route").stdout
    assert "default" not in routes
    assert str(core.subnet()) in routes


def _make_container(lab, host, name: str, template: str, octet: int) -> None:
    ssh(lab, host, "lxc-create", "-n", name, "-t", template)
    cfg = f"/var/lib/lxc/{name}/config"
    ssh(lab, host, "sh", "-c", f"printf 'lxc.net.0.ipv4.address = {_net_ip(octet)}/24\\n' >> {cfg}")
    ssh(lab, host, "lxc-start", "-n", name)
    assert ssh(lab, host, "lxc-wait", "-n", name, "-s", "RUNNING", "-t", "30").returncode == 0


def _counter(lab, host, name: str) -> int:
    """The counter's value; read again while the file is empty (its shell is rewriting it)."""
    for _ in range(20):
        out = ssh(lab, host, "lxc-attach", "-n", name, "--", "cat", "/tmp/count", check=False)
        if out.stdout.strip():
            return int(out.stdout.strip())
        time.sleep(0.05)
    return 0


def _quiet(*cmd: str) -> tuple[str, ...]:
    """Run cmd with stdio off the SSH channel: the LXC monitor that
    ``lxc-checkpoint -r`` leaves behind keeps its caller's stdout/stderr open, so an
    SSH session that gave it the channel's pipes would never see EOF."""
    return (
        "sh",
        "-c",
        shlex.join(cmd) + " </dev/null >/tmp/ctweb-lab-cmd.log 2>&1 || { cat /tmp/ctweb-lab-cmd.log; exit 1; }",
    )


def test_it_checkpoints_and_restores_a_busybox_container(lab):
    a, b = lab["hosts"]
    ip = _net_ip(90)
    _make_container(lab, a, "bb1", "busybox", 90)
    # a session-leader counter inside the container (LAB.md: setsid, or the dump fails)
    loop = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"
    ssh(
        lab,
        a,
        "lxc-attach",
        "-n",
        "bb1",
        "--",
        "/bin/sh",
        "-c",
        f"setsid /bin/sh -c '{loop}' </dev/null >/dev/null 2>&1 &",
    )
    assert wait_for(lambda: _counter(lab, a, "bb1") > 5)
    # one L2 segment: reachable from the root namespace and from the other host
    assert wait_for(lambda: ping_from_root(ip))
    assert ssh(lab, b, "ping", "-c", "1", "-W", "2", ip, check=False).returncode == 0

    ssh(lab, a, "mkdir", "-p", "/tmp/ck-bb1")
    t0 = time.monotonic()
    dump = ssh(lab, a, *_quiet("lxc-checkpoint", "-n", "bb1", "-s", "-D", "/tmp/ck-bb1"), check=False)
    t_dump = time.monotonic() - t0
    if dump.returncode != 0:
        log = ssh(lab, a, "sh", "-c", "tail -50 /tmp/ck-bb1/*.log", check=False).stdout
        raise AssertionError(f"dump failed: {dump.stdout}\n{log}")
    assert "STOPPED" in ssh(lab, a, "lxc-info", "-n", "bb1", "-s").stdout
    before = int(ssh(lab, a, "cat", "/var/lib/lxc/bb1/rootfs/tmp/count", check=False).stdout.strip() or 0)
    assert not ping_from_root(ip)
    time.sleep(1)
    t0 = time.monotonic()
    restore = ssh(lab, a, *_quiet("lxc-checkpoint", "-n", "bb1", "-r", "-D", "/tmp/ck-bb1"), check=False)
    t_restore = time.monotonic() - t0
    if restore.returncode != 0:
        log = ssh(lab, a, "sh", "-c", "tail -50 /tmp/ck-bb1/*.log", check=False).stdout
        raise AssertionError(f"restore failed: {restore.stdout}\n{log}")
    print(f"\nlxc-checkpoint over ssh: dump+stop {t_dump:.2f}s, restore {t_restore:.2f}s")
    assert "RUNNING" in ssh(lab, a, "lxc-info", "-n", "bb1", "-s").stdout
    # the same counter keeps counting from where it was frozen (not restarted at 0)
    first = _counter(lab, a, "bb1")
    assert first >= before
    assert wait_for(lambda: _counter(lab, a, "bb1") > first + 3)
    assert wait_for(lambda: ping_from_root(ip))
    assert ssh(lab, b, "ping", "-c", "1", "-W", "2", ip, check=False).returncode == 0
    ssh(lab, a, "lxc-stop", "-k", "-n", "bb1")
    ssh(lab, a, "lxc-destroy", "-n", "bb1")


def test_it_runs_and_checkpoints_a_debian_template_container(lab):
    a, b = lab["hosts"]
    ip = _net_ip(91)
    _make_container(lab, b, "deb1", "debian", 91)
    out = ssh(lab, b, "lxc-attach", "-n", "deb1", "--", "python3", "-c", "import sys; print(sys.version_info[:2])")
    assert out.stdout.strip().startswith("(3, 1")
    assert "Debian GNU/Linux 13" in ssh(lab, b, "cat", "/var/lib/lxc/deb1/rootfs/etc/os-release").stdout
    assert wait_for(lambda: ping_from_root(ip))
    assert ssh(lab, a, "ping", "-c", "1", "-W", "2", ip, check=False).returncode == 0
    # a python process keeps counting across a dump + restore
    prog = "import itertools, time\nfor i in itertools.count():\n    open('/tmp/count', 'w').write(str(i)); time.sleep(0.1)\n"
    ssh(
        lab,
        b,
        "lxc-attach",
        "-n",
        "deb1",
        "--",
        "sh",
        "-c",
        f"setsid python3 -c {shlex.quote(prog)} </dev/null >/dev/null 2>&1 &",
    )
    assert wait_for(lambda: _counter(lab, b, "deb1") > 3)
    ssh(lab, b, "mkdir", "-p", "/tmp/ck-deb1")
    dump = ssh(lab, b, *_quiet("lxc-checkpoint", "-n", "deb1", "-s", "-D", "/tmp/ck-deb1"), check=False)
    assert dump.returncode == 0, dump.stdout
    restore = ssh(lab, b, *_quiet("lxc-checkpoint", "-n", "deb1", "-r", "-D", "/tmp/ck-deb1"), check=False)
    assert restore.returncode == 0, restore.stdout
    first = _counter(lab, b, "deb1")
    assert wait_for(lambda: _counter(lab, b, "deb1") > first + 3)
    assert wait_for(lambda: ping_from_root(ip))
    ssh(lab, b, "lxc-stop", "-k", "-n", "deb1")
    ssh(lab, b, "lxc-destroy", "-n", "deb1")


def test_it_moves_a_checkpointed_container_to_another_host(lab):
    """Stop-and-copy by hand: dump on lab-a, copy config+rootfs+images, restore on lab-b.
    The container keeps its address on the shared container segment."""
    a, b = lab["hosts"]
    ip = _net_ip(92)
    _make_container(lab, a, "mig1", "busybox", 92)
    loop = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"
    ssh(
        lab,
        a,
        "lxc-attach",
        "-n",
        "mig1",
        "--",
        "/bin/sh",
        "-c",
        f"setsid /bin/sh -c '{loop}' </dev/null >/dev/null 2>&1 &",
    )
    assert wait_for(lambda: _counter(lab, a, "mig1") > 3)
    ssh(lab, a, "mkdir", "-p", "/tmp/mig1")
    dump = ssh(lab, a, *_quiet("lxc-checkpoint", "-n", "mig1", "-s", "-D", "/tmp/mig1"), check=False)
    assert dump.returncode == 0, dump.stdout
    frozen = int(ssh(lab, a, "cat", "/var/lib/lxc/mig1/rootfs/tmp/count").stdout)
    copy(lab, a, b, "var/lib/lxc/mig1", "tmp/mig1")
    restore = ssh(lab, b, *_quiet("lxc-checkpoint", "-n", "mig1", "-r", "-D", "/tmp/mig1"), check=False)
    assert restore.returncode == 0, restore.stdout
    assert _counter(lab, b, "mig1") >= frozen
    assert wait_for(lambda: _counter(lab, b, "mig1") > frozen + 3)
    assert wait_for(lambda: ping_from_root(ip))
    assert ssh(lab, a, "ping", "-c", "1", "-W", "2", ip, check=False).returncode == 0
    ssh(lab, b, "lxc-stop", "-k", "-n", "mig1")
    ssh(lab, b, "lxc-destroy", "-n", "mig1")
    ssh(lab, a, "lxc-destroy", "-n", "mig1")


def test_it_repairs_a_half_broken_lab(lab):
    a, b = lab["hosts"]
    # lab-b's init dies and one of lab-a's links disappears: up() puts both back
    os.kill(b["pid"], 9)
    assert wait_for(lambda: core._proc_starttime(b["pid"]) is None, 10)
    subprocess.run(["ip", "link", "del", core._root_links("lab-a")[1]], check=True)
    assert [r["running"] for r in core.status()] == [True, False]
    hosts = core.up(N_HOSTS, lab["pubkey"])
    assert hosts[0] == a
    assert hosts[1]["pid"] != b["pid"] and hosts[1]["host_key"] == b["host_key"]
    lab["hosts"][:] = hosts
    assert ssh(lab, hosts[1], "criu", "check").returncode == 0
    assert all(r["running"] and r["sshd"] for r in core.status())


SIDE = "9"  # the lab instance the next test brings up and takes down beside the session's


def _side_lab(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CTWEB_LAB_ID": SIDE}
    env.pop("CTWEB_LAB_SUBNET", None)
    cmd = [sys.executable, "-m", "lab", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=core.PROJECT_DIR, timeout=300)


def _side_names() -> dict:
    code = "import json; from lab import core as c; print(json.dumps([c.NETNS_PREFIX, c.ROOT_BRIDGE, c.LINK_PREFIX, c.CGROUP_PREFIX, str(c.hosts_dir())]))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=core.PROJECT_DIR,
        env={**os.environ, "CTWEB_LAB_ID": SIDE},
    ).stdout
    return dict(zip(("netns", "bridge", "links", "cgroups", "hosts"), json.loads(out), strict=True))


def test_a_second_instance_runs_beside_the_first_and_leaves_no_trace_after_down(lab):
    """Another lab instance (CTWEB_LAB_ID) comes up beside the session's, with its own names
    and /24, and its down() removes everything it made and nothing of the session's lab."""
    names = _side_names()
    assert names["netns"] != core.NETNS_PREFIX and names["bridge"] != core.ROOT_BRIDGE
    with open(f"/run/lock/ctweb-lab{SIDE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        up = _side_lab("up", "--hosts", "2", "--json")
        assert up.returncode == 0, up.stdout + up.stderr
        hosts = json.loads(up.stdout[up.stdout.index("[\n") :])  # after the [lab] lines
        assert [h["address"] for h in hosts] == ["10.77.73.11", "10.77.73.12"]
        assert all(r["running"] and r["sshd"] for r in core.status())  # the session's lab is untouched
        t0 = time.monotonic()
        down = _side_lab("down")
        assert down.returncode == 0, down.stdout + down.stderr
        print(f"\ndown in {time.monotonic() - t0:.2f}s")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert names["netns"] not in netns and core.NETNS_PREFIX in netns
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert names["bridge"] not in links and f" {names['links']}" not in links
    assert core.ROOT_BRIDGE in links
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert names["hosts"] not in mountinfo and names["netns"] not in mountinfo
    for h in hosts:
        assert core._proc_starttime(h["pid"]) is None
    assert not Path(names["hosts"]).exists()
    assert (core.lab_dir() / "rootfs" / core.HOST_STAMP).exists()  # the cache stays
    cg = Path("/sys/fs/cgroup")
    assert not [p for p in cg.glob(f"*/**/{names['cgroups']}lab-*") if p.is_dir()]
    assert all(r["running"] and r["sshd"] for r in core.status())
    assert ssh(lab, lab["hosts"][0], "true").returncode == 0
