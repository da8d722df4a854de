"""The ctweb lab: LXC/CRIU "hosts" made of Linux namespaces on this one machine.

Standard library only.  Must run as root.  Public API::

    build_rootfs() -> Path
    up(n_hosts: int = 2, authorized_key: str | None = None) -> list[dict]
    down() -> None
    status() -> list[dict]

Layout (``LAB_DIR`` = ``$CTWEB_LAB_DIR`` or ``<project>/var/lab``)::

    LAB_DIR/rootfs/                 cached Debian 13 (trixie) host root (criu 4.x, lxc 6.x,
                                    sshd, python3, pycriu, busybox-static, iptables, ...)
    LAB_DIR/templates/debian/       cached Debian 13 minbase + python3 + sysvinit, the
                                    rootfs of the ``debian`` container template
    LAB_DIR/hosts/lab-a/root/       the host's private copy of rootfs (pivot_root target)
    LAB_DIR/hosts/lab-a/pid         pid of the host's init, as seen from the root namespace,
                                    followed by its start time (guards against pid reuse)
    LAB_DIR/hosts/lab-a/cgroups.json  the per-host cgroup directories the lab created
    LAB_DIR/hosts/lab-b/btrfs.img   only with CTWEB_LAB_BTRFS=lab-b (below): a sparse image,
    LAB_DIR/hosts/lab-b/btrfs/      loop-mounted here; its lxc/ and ctweb/ are bind-mounted
                                    on the host's /var/lib/lxc and /var/lib/ctweb

Btrfs hosts (opt-in, default off): ``CTWEB_LAB_BTRFS`` names hosts (comma-separated, e.g.
``lab-b``) whose /var/lib/lxc and /var/lib/ctweb are one btrfs filesystem of their own, so
the agent keeps rootfs as subvolumes and snapshots as btrfs snapshots (hosts/agent/ctweb_agent/
cow.py). Made when up() starts the host (needs mkfs.btrfs on the machine: btrfs-progs); a
host already running keeps what it has. down() unmounts it with everything else under the
host's directory (the loop device is freed with its last mount) and removes the image.

Each host ``lab-X`` is: its own network namespace ``ctweb-lab-X`` (``ip netns``), plus
mount, pid, uts, ipc and cgroup namespaces; pivot_root into its own copy of the rootfs;
proc, sysfs, a tmpfs /dev with mknod'ed nodes and a fresh devpts instance, a tmpfs /run,
cgroup v1 hierarchies mounted at /sys/fs/cgroup/* (rooted, through the cgroup namespace,
at a per-host cgroup ``ctweb-lab-X`` below the caller's own cgroup); its pid 1 is a small
python init (``/usr/local/sbin/ctweb-lab-init`` inside the host, log in
/var/log/ctweb-lab-init.log) that reaps children, keeps ``sshd`` running on the host's
lab address, port 22 (log /var/log/sshd.log), and ignores SIGTERM like a real init:
down() SIGKILLs it, which ends everything in the host's pid namespace, containers too.
Every fd above 2 is closed before the init is exec'ed (CRIU refuses foreign fds).
Host ssh keys (ed25519 only) are generated per host at up() and live until down().

Network (no uplink, no NAT, no forwarding; nothing outside ``SUBNET`` is ever addressed)::

    root ns:  bridge ROOT_BRIDGE (ctweb-br0) with SUBNET .1/24
              ctl-X-eth  <-veth->  eth0   in ctweb-lab-X, SUBNET .11 (lab-a), .12 (lab-b) ...
              ctl-X-ct   <-veth->  ctup   in ctweb-lab-X, enslaved to HOST_BRIDGE (lxcbr0)

So the container bridges (``lxcbr0``) of all hosts and the root bridge are ONE L2
segment: a container keeps its static IPv4 (``CONTAINER_RANGE``, .100-.250 of SUBNET,
assigned by the dashboard, e.g. ``lxc.net.0.ipv4.address = 10.77.64.100/24``) on any host
and is reachable from the root namespace and from every host.  /etc/lxc/default.conf in
each host gives new containers ``veth`` on ``lxcbr0`` with a random 00:16:3e MAC.

Container templates inside every host:

* ``busybox`` -- the stock lxc-busybox template, patched in each host at up() so it no
  longer bind-mounts /lib, /usr/lib, /lib64, /usr/lib64 and /sys/kernel/security (those
  make ``lxc-checkpoint -r`` fail in CRIU's mount-v2 engine), no longer runs udhcpc (it
  flushes the static address), and has ``lxc.tty.max = 0`` and no getty (a getty on an
  LXC tty makes the dump fail: "tty: Unable to find a master for /0").
* ``debian`` (alias ``ctweb-debian``) -- offline: copies ``HOST_DEBIAN_TEMPLATE``
  (/var/lib/ctweb/templates/debian/rootfs inside the host; hosts have no route to any
  package registry) into the container's rootfs; sysvinit (no gettys) is the init;
  ``lxc.pty.max = 1`` (with 16, ``lxc-checkpoint -r`` fails: "lxc.console.path
  configured on source host but not target").

Both templates' containers were dumped and restored with ``lxc-checkpoint -s``/``-r``,
also moved lab-a -> lab-b (tests/lab).  Note for callers: the LXC monitor that
``lxc-checkpoint -r`` leaves running keeps the caller's stdout/stderr open, so run it
with stdio redirected to files (or an SSH session never sees EOF).

Hosts beyond ``n_hosts`` that already run are left alone by up(); down() stops all.

The bare host (``up_bare``, ``python -m lab up-bare --key FILE``): ``lab-z`` (.36), made like the
others (namespaces, cgroups, its own ``lxcbr0`` on the shared segment, sshd) but from a second
cached rootfs (``LAB_DIR/rootfs-bare``: debootstrap minbase with openssh-server, python3 and
ca-certificates only), with no LXC, CRIU, templates or network description: what a freshly
installed server has, for ctweb's prepare to make ready (tests/hosts/test_e2e_lab_prepare.py).
It reaches the registry through the lab's package proxy (lab/apt_proxy.py, started by up_bare
on the bridge address, port 3142, stopped by down() by its recorded pid), named in its apt
configuration: the proxy forwards GET and HEAD of http://deb.debian.org/ only.

fs.pipe-max-size (machine-wide; CRIU lazy pages need ~3.2 MiB pipes) is raised to 4 MiB
by up(); the old value is saved in /run/ctweb-lab-pipe-max-size.orig and restored by the
down() of the last lab instance on the machine.

Instances: several labs can run side by side on one machine (a second checkout's test run,
the fault matrix in chunks, a fresh-clone check).  ``CTWEB_LAB_ID`` (a digit 1-9; unset is
the default instance) names everything an instance makes on the machine: netns
``ctweb-labN-X``, bridge ``ctweb-brN``, links ``ctlN-X-*``, cgroups ``ctwebN-lab-X``, lock
``/run/lock/ctweb-labN.lock``, host directories ``LAB_DIR/instanceN/hosts``, and its
default subnet 10.77.(64+N).0/24 (``CTWEB_LAB_SUBNET`` still overrides it).  The rootfs
cache is shared.  Each instance addresses only its own /24 on its own bridge.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
# What the lab writes into each host, as files: its init, sshd's and LXC's configuration, the
# offline debian template and its containers' inittab (see _configure_host_root).
FILES_DIR = Path(__file__).resolve().with_name("files")


def _instance_id() -> str:
    value = os.environ.get("CTWEB_LAB_ID", "")
    if value not in ("", *"123456789"):
        raise SystemExit(f"lab: CTWEB_LAB_ID must be one digit 1-9 (or unset), not {value!r}")
    return value


INSTANCE = _instance_id()
DEFAULT_SUBNET = f"10.77.{64 + int(INSTANCE or 0)}.0/24"
NETNS_PREFIX = f"ctweb-lab{INSTANCE}-"
ROOT_BRIDGE = f"ctweb-br{INSTANCE or 0}"
CGROUP_PREFIX = f"ctweb{INSTANCE}-"  # + the host's name: ctweb-lab-a, ctweb2-lab-a
LOCK_PATH = f"/run/lock/ctweb-lab{INSTANCE}.lock"  # one test session or bench per instance
ANY_NETNS_PREFIX = "ctweb-lab"  # every instance's namespaces start so
PIPE_ORIG = Path("/run/ctweb-lab-pipe-max-size.orig")  # machine-wide, like the sysctl
NETNS_DIR_MARKER = Path("/run/ctweb-lab-netns-dir-created")
HOST_BRIDGE = "lxcbr0"  # inside every host's netns
HOST_IFACE = "eth0"  # the host's own interface inside its netns
HOST_UPLINK = "ctup"  # inside the host netns, enslaved to HOST_BRIDGE
LINK_PREFIX = f"ctl{INSTANCE}-"  # root-namespace ends of the lab's veth pairs
HOST_FIRST_OCTET = 11  # lab-a = .11, lab-b = .12, ...
CONTAINER_RANGE = (100, 250)  # last octets the dashboard may give containers
MAX_HOSTS = 26
SSH_PORT = 22
HOST_DEBIAN_TEMPLATE = "/var/lib/ctweb/templates/debian/rootfs"
PIPE_MAX_SIZE = 4 * 1024 * 1024
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SUITE = "trixie"
HOST_PACKAGES = [
    "criu",
    "python3-pycriu",
    "lxc",
    "lxc-templates",
    "busybox-static",
    "iptables",
    "openssh-server",
    "openssh-client",
    "rsync",
    "python3",
    "python3-lxc",
    "iproute2",
    "procps",
    "iputils-ping",
    "psmisc",
    "xz-utils",
    "zstd",
]
DEBIAN_TEMPLATE_PACKAGES = ["python3", "iproute2", "iputils-ping", "procps", "sysvinit-core"]
STAMP = ".ctweb-lab-complete"
# CRIU comes from sid: trixie's 4.1.1 cannot dump any inet socket on kernels >= 6.16 ("Can't
# get 1:16 opt"), 4.2.1 can (docs/LAB-NOTES.md). The host rootfs's stamp names it, so a cache
# built before is rebuilt.
CRIU_SUITE = "sid"
CRIU_PACKAGES = ["criu", "python3-pycriu"]
HOST_STAMP = ".ctweb-lab-complete-criu-sid"
# A bare host (up_bare): what a freshly installed server offers before ctweb's prepare, sshd,
# python3 and its apt sources; the rest comes through the lab's package proxy (lab/apt_proxy.py).
BARE_PACKAGES = ["openssh-server", "python3", "ca-certificates"]
BARE_STAMP = ".ctweb-lab-complete-bare"
BARE_HOST_INDEX = MAX_HOSTS - 1  # lab-z, .36: past the hosts up() starts in practice
APT_PROXY_PORT = 3142
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


class LabError(RuntimeError):
    """A clear, expected failure (not root, no namespaces, a command failed...)."""


# ---------------------------------------------------------------- small helpers


def lab_dir() -> Path:
    return Path(os.environ.get("CTWEB_LAB_DIR") or PROJECT_DIR / "var" / "lab").resolve()


def instance_dir() -> Path:
    """Where this instance keeps its hosts (the rootfs cache in lab_dir() is shared)."""
    return lab_dir() / f"instance{INSTANCE}" if INSTANCE else lab_dir()


def hosts_dir() -> Path:
    return instance_dir() / "hosts"


def subnet() -> ipaddress.IPv4Network:
    net = ipaddress.IPv4Network(os.environ.get("CTWEB_LAB_SUBNET") or DEFAULT_SUBNET)
    if net.prefixlen != 24 or not net.subnet_of(ipaddress.IPv4Network("10.0.0.0/8")):
        raise LabError(f"lab subnet must be a /24 inside 10.0.0.0/8, not {net}")
    return net


def bridge_address() -> str:
    return str(subnet().network_address + 1)


def host_name(index: int) -> str:
    return "lab-" + chr(ord("a") + index)


def host_address(index: int) -> str:
    return str(subnet().network_address + HOST_FIRST_OCTET + index)


def _letter(name: str) -> str:
    return name.split("-", 1)[1]


def _netns(name: str) -> str:
    return NETNS_PREFIX + _letter(name)


def _root_links(name: str) -> tuple[str, str]:
    letter = _letter(name)
    return f"{LINK_PREFIX}{letter}-eth", f"{LINK_PREFIX}{letter}-ct"


def _say(msg: str) -> None:
    print(f"[lab] {msg}", flush=True)


def _run(args: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise LabError(f"command failed ({proc.returncode}): {' '.join(args)}\n{proc.stdout}{proc.stderr}".rstrip())
    return proc


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab must run as root (it creates namespaces, bridges and mounts)")
    for ns in ("net", "mnt", "pid", "uts", "ipc", "cgroup"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            raise LabError(f"this kernel has no {ns} namespaces: the lab cannot run here")
    for tool in ("ip", "ssh-keygen", "cp"):
        if not shutil.which(tool):
            raise LabError(f"missing tool on the machine: {tool} (see scripts/apt-lab.txt)")


def _proc_starttime(pid: int) -> str | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None  # a zombie is dead for our purposes
    return fields[19]


def _read_pidfile(hdir: Path) -> tuple[int, str] | None:
    try:
        pid_s, start = (hdir / "pid").read_text().split()
        return int(pid_s), start
    except (OSError, ValueError):
        return None


def _alive_pid(hdir: Path) -> int | None:
    """The recorded init pid if that very process (same start time) still runs."""
    rec = _read_pidfile(hdir)
    if rec and _proc_starttime(rec[0]) == rec[1]:
        return rec[0]
    return None


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == prefix.rstrip("/") or mnt.startswith(prefix):
                found.append(mnt)
    return found


def _umount_all_under(path: Path) -> None:
    for mnt in sorted(set(_mounts_under(path)), key=len, reverse=True):
        _run(["umount", "-l", mnt], check=False)


def _rmtree(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    _umount_all_under(path)
    _run(["rm", "-rf", "--one-file-system", "--", str(path)])


def _link_exists(name: str, netns: str | None = None) -> bool:
    args = ["ip"] + (["-n", netns] if netns else []) + ["link", "show", "dev", name]
    return _run(args, check=False).returncode == 0


def _file(name: str) -> str:
    """One of the files the lab writes into its hosts (lab/files/)."""
    return (FILES_DIR / name).read_text()


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.ctweb-tmp-{os.getpid()}")  # two lab ups may write one file
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# ---------------------------------------------------------------- root filesystems


def _install_from(root: Path, suite: str, packages: list[str]) -> None:
    """apt-get install packages from another suite into a built rootfs (only those, and what
    they need: everything else stays trixie's)."""
    (root / "etc/apt/sources.list.d/ctweb-extra.list").write_text(f"deb {DEBIAN_MIRROR} {suite} main\n")
    (root / "etc/apt/preferences.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/apt/preferences.d/ctweb-extra").write_text(f"Package: *\nPin: release n={suite}\nPin-Priority: 100\n")
    # The registry's snapshot of sid is older than its Release file's Valid-Until.
    script = (
        "mount -t proc proc /proc && mount -t devtmpfs dev /dev || exit 1; "
        "apt-get -o Acquire::Check-Valid-Until=false -qq update && "
        f"DEBIAN_FRONTEND=noninteractive apt-get -y -qq -t {suite} install {' '.join(packages)}; "
        "rc=$?; umount /dev; umount /proc; exit $rc"
    )
    _say(f"installing {', '.join(packages)} from {suite}")
    proc = subprocess.run(
        ["unshare", "-m", "chroot", str(root), "/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise LabError(f"installing {packages} from {suite} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def _debootstrap(target: Path, packages: list[str], stamp: str = STAMP, then=None) -> None:
    if not shutil.which("debootstrap"):
        raise LabError("debootstrap is not installed on the machine (apt-get install debootstrap)")
    if not Path(f"/usr/share/debootstrap/scripts/{SUITE}").exists():
        raise LabError(f"this debootstrap does not know {SUITE}; upgrade debootstrap")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(target.name + ".tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid():
            raise LabError(f"another build (pid {pid}) is writing {stale}")
        _say(f"removing half-built {stale}")
        _rmtree(stale)
    tmp = parent / f"{target.name}.tmp-{os.getpid()}"
    _say(f"debootstrap {SUITE} into {tmp} (a minute or two)")
    t0 = time.monotonic()
    proc = subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=" + ",".join(packages), SUITE, str(tmp), DEBIAN_MIRROR],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    _umount_all_under(tmp)  # debootstrap may leave proc/sys mounted when it fails
    if proc.returncode != 0:
        log = tmp / "debootstrap" / "debootstrap.log"
        tail = log.read_text()[-3000:] if log.exists() else ""
        raise LabError(f"debootstrap failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{tail}")
    if then is not None:
        then(tmp)
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for f in (tmp / sub).glob("*"):
            if f.is_file():
                f.unlink()
    # hosts must not share ssh host keys: generated per host at up()
    for key in (tmp / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (tmp / stamp).write_text(f"built {time.ctime()} in {time.monotonic() - t0:.0f}s\n")
    os.rename(tmp, target)
    _say(f"built {target} in {time.monotonic() - t0:.0f}s")


def build_rootfs() -> Path:
    """Build (once; cached) the host rootfs and the debian template rootfs.

    Returns LAB_DIR/rootfs.  Each is built in a temporary directory and renamed into
    place only when complete, so a half-finished build is never used.
    """
    require_root()
    base = lab_dir()
    rootfs = base / "rootfs"
    debian = base / "templates" / "debian"
    builds = (
        (rootfs, HOST_PACKAGES, HOST_STAMP, lambda tmp: _install_from(tmp, CRIU_SUITE, CRIU_PACKAGES)),
        (debian, DEBIAN_TEMPLATE_PACKAGES, STAMP, None),
    )
    base.mkdir(parents=True, exist_ok=True)
    # One build at a time per cache (several lab instances, e.g. xdist workers, share it): the
    # others wait here and find it built.
    with open(base / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for target, pkgs, stamp, then in builds:
            if (target / stamp).exists():
                continue
            if target.exists():  # renamed but stamp missing (or an older build): not ours complete
                _rmtree(target)
            _debootstrap(target, pkgs, stamp, then)
    return rootfs


def build_bare_rootfs() -> Path:
    """Build (once; cached beside the full one) the bare host rootfs: debootstrap minbase of
    trixie with only openssh-server, python3 and ca-certificates. Returns LAB_DIR/rootfs-bare."""
    require_root()
    base = lab_dir()
    target = base / "rootfs-bare"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / BARE_STAMP).exists():
            if target.exists():
                _rmtree(target)
            _debootstrap(target, BARE_PACKAGES, BARE_STAMP)
    return target


# ---------------------------------------------------------------- host configuration


def _patch_busybox_template(path: Path) -> None:
    """Make the stock lxc-busybox template CRIU-friendly and static-address friendly:

    * drop the bind mounts of /lib, /usr/lib, /lib64, /usr/lib64, /sys/kernel/security
      (CRIU's mount-v2 restore fails on them, docs/LAB-NOTES.md; busybox-static needs no libraries);
    * drop ``/bin/udhcpc`` from the container's rcS: it flushes the static address LXC
      set from ``lxc.net.0.ipv4.address`` and then keeps broadcasting DHCP requests;
    * ``lxc.tty.max = 0`` and no getty on tty1 (see below).
    """
    text = path.read_text()
    text, n_mounts = re.subn(
        r"(?m)^(\s*)(echo\s+\"lxc\.mount\.entry\s*=\s*(?:/?\$\{?dir\}?|/sys/kernel/security)[^\n]*)$",
        r"\1: # ctweb-lab removed: \2",
        text,
    )
    text, n_dhcp = re.subn(
        r"(?m)^/bin/udhcpc$", "# /bin/udhcpc (ctweb-lab: static addresses from the LXC config)", text
    )
    # * no ttys and no getty on tty1: LXC 6 holds the ttys' masters in its monitor and
    #   the dump fails with "tty: Unable to find a master for /0" (use lxc-attach).
    text, n_tty = re.subn(r"(?m)^lxc\.tty\.max = \d+$", "lxc.tty.max = 0", text)
    text, n_getty = re.subn(r"(?m)^tty1::respawn:/bin/getty.*$", "# ctweb-lab: no getty (ttys break CRIU dumps)", text)
    n_dhcp += n_tty + n_getty
    if (
        "ctweb-lab removed" not in text
        or "ctweb-lab: static addresses" not in text
        or "ctweb-lab: no getty" not in text
    ):
        raise LabError(f"could not patch {path}: expected lines not found (template changed?)")
    if n_mounts or n_dhcp:
        path.write_text(text)


def _configure_host_root(root: Path, name: str, index: int, n_hosts: int, authorized_key: str | None) -> None:
    addr = host_address(index)
    _write(root / "etc/hostname", name + "\n")
    hosts = ["127.0.0.1 localhost", f"{bridge_address()} lab-gw"]
    hosts += [f"{host_address(i)} {host_name(i)}" for i in range(max(n_hosts, index + 1))]
    _write(root / "etc/hosts", "\n".join(hosts) + "\n")
    _write(root / "usr/local/sbin/ctweb-lab-init", _file("ctweb-lab-init"), 0o755)
    _write(
        root / "etc/ssh/sshd_config.d/ctweb-lab.conf",
        _file("sshd_config").format(name=name, address=addr, port=SSH_PORT),
    )
    key = root / "etc/ssh/ssh_host_ed25519_key"
    if not key.exists():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", str(key)])
    if authorized_key is not None:
        line = authorized_key.strip()
        if "\n" in line or not line.startswith(("ssh-", "ecdsa-", "sk-")):
            raise LabError("authorized_key must be one OpenSSH public key line")
        sshdir = root / "root/.ssh"
        sshdir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(sshdir, 0o700)
        ak = sshdir / "authorized_keys"
        keys = ak.read_text().splitlines() if ak.exists() else []
        if line not in keys:  # additive: several users/test sessions may share a lab
            _write(ak, "".join(k + "\n" for k in keys + [line]), 0o600)
    # LXC: no AppArmor anywhere (the kernel has none; restore fails otherwise)
    _write(root / "etc/lxc/default.conf", _file("lxc-default.conf").format(bridge=HOST_BRIDGE))
    for conf in (root / "usr/share/lxc/config").glob("*.conf"):
        text = conf.read_text()
        if "lxc.apparmor" in text:
            conf.write_text("".join(ln for ln in text.splitlines(True) if not ln.lstrip().startswith("lxc.apparmor")))
    _write(root / "etc/default/lxc-net", 'USE_LXC_BRIDGE="false"\n')
    tdir = root / "usr/share/lxc/templates"
    _patch_busybox_template(tdir / "lxc-busybox")
    script = _file("lxc-ctweb-debian").replace("@SRC@", HOST_DEBIAN_TEMPLATE)
    _write(tdir / "lxc-ctweb-debian", script, 0o755)
    _write(tdir / "lxc-debian", script, 0o755)  # the stock one needs a registry
    tmpl = root / HOST_DEBIAN_TEMPLATE.lstrip("/")
    _write(tmpl / "etc/inittab", _file("inittab"))
    for d in ("var/lib/lxc", "var/lib/ctweb", "var/log", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)


def btrfs_hosts() -> set[str]:
    """The hosts CTWEB_LAB_BTRFS asks to put on btrfs (see the module's docstring)."""
    names = {n.strip() for n in os.environ.get("CTWEB_LAB_BTRFS", "").split(",") if n.strip()}
    bad = [n for n in names if not re.fullmatch(r"lab-[a-z]", n)]
    if bad:
        raise LabError(f"CTWEB_LAB_BTRFS names hosts like lab-b, not {bad}")
    return names


BTRFS_IMAGE_BYTES = 4 << 30  # sparse: only what the host writes takes disk


def _ensure_btrfs(hdir: Path, root: Path, name: str) -> None:
    """The host's /var/lib/lxc and /var/lib/ctweb on one btrfs of its own (idempotent)."""
    if not shutil.which("mkfs.btrfs"):
        raise LabError(f"{name}: CTWEB_LAB_BTRFS needs mkfs.btrfs on this machine (apt-get install btrfs-progs)")
    img, mnt = hdir / "btrfs.img", hdir / "btrfs"
    if str(mnt) not in _mounts_under(mnt):
        if not img.exists():
            with open(img, "wb") as fh:
                fh.truncate(BTRFS_IMAGE_BYTES)
            _run(["mkfs.btrfs", "-q", str(img)])
        mnt.mkdir(exist_ok=True)
        _run(["mount", "-o", "loop", str(img), str(mnt)])  # autoclear: the loop goes with the mount
        _say(f"{name}: btrfs {img} mounted on {mnt}")
    for sub in ("lxc", "ctweb"):
        target = root / "var/lib" / sub
        if str(target) in _mounts_under(target):
            continue
        src = mnt / sub
        if not src.exists():  # first time: what the host root has there (the debian template)
            _run(["cp", "-a", "--reflink=auto", str(target), str(src)])
        _run(["mount", "--bind", str(src), str(target)])


def _prepare_host_root(hdir: Path, name: str) -> Path:
    """The host's own copy of the rootfs (+ the debian template staged inside it)."""
    root = hdir / "root"
    if (root / HOST_STAMP).exists() and (root / ".ctweb-lab-host").exists():
        return root
    _rmtree(root)
    tmp = hdir / "root.tmp"
    _rmtree(tmp)
    base = lab_dir()
    t0 = time.monotonic()
    _say(f"{name}: copying rootfs into {root}")
    _run(["cp", "-a", "--reflink=auto", str(base / "rootfs"), str(tmp)])
    dst = tmp / HOST_DEBIAN_TEMPLATE.lstrip("/")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _run(["cp", "-a", "--reflink=auto", str(base / "templates" / "debian"), str(dst)])
    (dst / STAMP).unlink(missing_ok=True)
    (tmp / ".ctweb-lab-host").write_text(name + "\n")
    os.rename(tmp, root)
    _say(f"{name}: copied in {time.monotonic() - t0:.1f}s")
    return root


def _configure_bare_root(root: Path, name: str, index: int, authorized_key: str) -> None:
    """A bare host gets only what the lab needs to reach it (hostname, its init, sshd, root's
    key) and its apt sources pointed at the lab's package proxy: no LXC, no CRIU, no network
    description; ctweb's prepare has to do the rest."""
    addr = host_address(index)
    _write(root / "etc/hostname", name + "\n")
    _write(root / "etc/hosts", f"127.0.0.1 localhost\n{bridge_address()} lab-gw\n{addr} {name}\n")
    _write(root / "usr/local/sbin/ctweb-lab-init", _file("ctweb-lab-init"), 0o755)
    _write(
        root / "etc/ssh/sshd_config.d/ctweb-lab.conf",
        _file("sshd_config").format(name=name, address=addr, port=SSH_PORT),
    )
    key = root / "etc/ssh/ssh_host_ed25519_key"
    if not key.exists():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", str(key)])
    line = authorized_key.strip()
    if "\n" in line or not line.startswith(("ssh-", "ecdsa-", "sk-")):
        raise LabError("authorized_key must be one OpenSSH public key line")
    sshdir = root / "root/.ssh"
    sshdir.mkdir(mode=0o700, exist_ok=True)
    ak = sshdir / "authorized_keys"
    keys = ak.read_text().splitlines() if ak.exists() else []
    if line not in keys:
        _write(ak, "".join(k + "\n" for k in keys + [line]), 0o600)
    # The registry's snapshot of sid (where a Debian 13 host on this kernel gets its CRIU) is
    # older than its Release file's Valid-Until: a property of the lab's registry, not the host.
    _write(
        root / "etc/apt/apt.conf.d/90ctweb-lab-proxy",
        f'Acquire::http::Proxy "http://{bridge_address()}:{APT_PROXY_PORT}/";\n'
        'Acquire::http::Pipeline-Depth "0";\n'
        'Acquire::Check-Valid-Until "false";\n',
    )
    for d in ("var/log", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)


def _prepare_bare_root(hdir: Path, name: str) -> Path:
    root = hdir / "root"
    if (root / BARE_STAMP).exists() and (root / ".ctweb-lab-host").exists():
        return root
    _rmtree(root)
    tmp = hdir / "root.tmp"
    _rmtree(tmp)
    t0 = time.monotonic()
    _run(["cp", "-a", "--reflink=auto", str(lab_dir() / "rootfs-bare"), str(tmp)])
    (tmp / ".ctweb-lab-host").write_text(name + "\n")
    os.rename(tmp, root)
    _say(f"{name}: bare root copied in {time.monotonic() - t0:.1f}s")
    return root


# ---------------------------------------------------------------- cgroups


def _cgroup_v1_layout() -> list[tuple[str, str, str]]:
    """[(dir name under /sys/fs/cgroup, mount options, our own path in it)] of the machine."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if ctrls:
            own[ctrls] = path
    layout = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            pre, post = line.split(" - ", 1)
            fstype, _src, superopts = post.split()[:3]
            mnt = pre.split()[4]
            if fstype != "cgroup" or not mnt.startswith("/sys/fs/cgroup/"):
                continue
            ctrls = [
                o
                for o in superopts.split(",")
                if o not in ("rw", "ro")
                and not o.startswith(("release_agent", "clone_children", "xattr", "noprefix", "cpuset_v2_mode"))
            ]
            key = ",".join(ctrls)
            opts = ",".join(["none"] + ctrls) if any(c.startswith("name=") for c in ctrls) else key
            layout.append((mnt.rsplit("/", 1)[1], opts, own.get(key, "/")))
    if not layout:
        raise LabError("the machine has no cgroup v1 hierarchies mounted under /sys/fs/cgroup")
    return layout


def _make_host_cgroups(hdir: Path, name: str) -> list[dict]:
    made = []
    for dirname, opts, own in _cgroup_v1_layout():
        base = Path("/sys/fs/cgroup") / dirname
        path = base / own.lstrip("/") / f"{CGROUP_PREFIX}{name}"
        path.mkdir(exist_ok=True)
        if "cpuset" in opts.split(","):
            for f in ("cpuset.cpus", "cpuset.mems"):
                if not (path / f).read_text().strip():
                    (path / f).write_text((path.parent / f).read_text())
        made.append({"dir": dirname, "opts": opts, "path": str(path)})
    _write(hdir / "cgroups.json", json.dumps(made, indent=1))
    return made


def _remove_cgroup_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            child.rmdir()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError as exc:
        _say(f"warning: cannot remove cgroup {path}: {exc}")


# ---------------------------------------------------------------- network


def _ensure_root_bridge() -> None:
    if not _link_exists(ROOT_BRIDGE):
        _say(f"creating bridge {ROOT_BRIDGE} {bridge_address()}/24")
        _run(["ip", "link", "add", ROOT_BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0"])
    _no_ipv6(ROOT_BRIDGE)
    cidr = f"{bridge_address()}/24"
    if cidr not in _run(["ip", "-4", "-o", "addr", "show", "dev", ROOT_BRIDGE]).stdout:
        _run(["ip", "addr", "add", cidr, "dev", ROOT_BRIDGE])
    _run(["ip", "link", "set", ROOT_BRIDGE, "up"])


def _no_ipv6(link: str) -> None:
    p = Path(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6")
    if p.exists():
        p.write_text("1")


def _ensure_host_network(name: str, index: int) -> None:
    ns = _netns(name)
    if not Path("/run/netns").exists() and not NETNS_DIR_MARKER.exists():
        _write(NETNS_DIR_MARKER, "ip netns add made /run/netns (a bind mount); down removes it when empty\n")
    if not Path(f"/run/netns/{ns}").exists():
        _run(["ip", "netns", "add", ns])
    eth, ct = _root_links(name)
    if not _link_exists(eth):
        if _link_exists(HOST_IFACE, ns):
            _run(["ip", "-n", ns, "link", "del", HOST_IFACE])
        _run(["ip", "link", "add", eth, "type", "veth", "peer", "name", HOST_IFACE, "netns", ns])
    if not _link_exists(HOST_BRIDGE, ns):
        _run(["ip", "-n", ns, "link", "add", HOST_BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0"])
    if not _link_exists(ct):
        if _link_exists(HOST_UPLINK, ns):
            _run(["ip", "-n", ns, "link", "del", HOST_UPLINK])
        _run(["ip", "link", "add", ct, "type", "veth", "peer", "name", HOST_UPLINK, "netns", ns])
    for link in (eth, ct):
        _no_ipv6(link)
        _run(["ip", "link", "set", link, "master", ROOT_BRIDGE, "up"])
    _run(["ip", "-n", ns, "link", "set", HOST_UPLINK, "master", HOST_BRIDGE, "up"])
    _run(["ip", "-n", ns, "link", "set", HOST_BRIDGE, "up"])
    _run(["ip", "-n", ns, "link", "set", "lo", "up"])
    cidr = f"{host_address(index)}/24"
    if cidr not in _run(["ip", "-n", ns, "-4", "-o", "addr", "show", "dev", HOST_IFACE]).stdout:
        _run(["ip", "-n", ns, "addr", "add", cidr, "dev", HOST_IFACE])
    _run(["ip", "-n", ns, "link", "set", HOST_IFACE, "up"])


# ---------------------------------------------------------------- starting a host


def _launch(spec: dict) -> int:
    """Runs in a throw-away child process (see __main__ below): enter the host's
    namespaces, fork its pid 1, set up its root and exec the init.  Prints the pid."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(ret: int, what: str) -> None:
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(src: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
        check(
            libc.mount(
                src.encode(),
                target.encode(),
                fstype.encode() if fstype else None,
                ctypes.c_ulong(flags),
                data.encode() if data else None,
            ),
            f"mount {fstype or 'bind'} {src} on {target} ({data or ''})",
        )

    root = spec["root"]
    fd = os.open(spec["netns"], os.O_RDONLY)
    check(libc.setns(fd, CLONE_NEWNET), "setns net")
    os.close(fd)
    for cg in spec["cgroups"]:
        with open(os.path.join(cg["path"], "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP), "unshare")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        err = b""
        while chunk := os.read(rfd, 4096):
            err += chunk
        if err:
            sys.stderr.write(err.decode(errors="replace"))
            return 1
        print(pid, flush=True)
        return 0
    # ---- pid 1 of the host
    try:
        os.close(rfd)
        os.setsid()
        hn = spec["hostname"].encode()
        check(libc.sethostname(hn, len(hn)), "sethostname")
        mount("none", "/", None, MS_REC | MS_PRIVATE)
        mount(root, root, None, MS_BIND | MS_REC)
        mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mount("sysfs", f"{root}/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mount("cgroup_root", f"{root}/sys/fs/cgroup", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=755")
        for cg in spec["cgroups"]:
            target = f"{root}/sys/fs/cgroup/{cg['dir']}"
            os.makedirs(target, exist_ok=True)
            mount("cgroup", target, "cgroup", MS_NOSUID | MS_NODEV | MS_NOEXEC, cg["opts"])
        dev = f"{root}/dev"
        mount("dev", dev, "tmpfs", MS_NOSUID, "mode=755,size=65536k")
        for node, major, minor in (
            ("null", 1, 3),
            ("zero", 1, 5),
            ("full", 1, 7),
            ("random", 1, 8),
            ("urandom", 1, 9),
            ("tty", 5, 0),
            ("net/tun", 10, 200),
            ("fuse", 10, 229),
        ):
            path = f"{dev}/{node}"
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.mknod(path, 0o666 | 0o020000, os.makedev(major, minor))
            os.chmod(path, 0o666)
        for d in ("pts", "shm", "mqueue"):
            os.makedirs(f"{dev}/{d}", exist_ok=True)
        mount("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5")
        os.symlink("pts/ptmx", f"{dev}/ptmx")
        mount("shm", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        mount("mqueue", f"{dev}/mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for link, target in (
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("core", "/proc/kcore"),
        ):
            os.symlink(target, f"{dev}/{link}")
        mount("run", f"{root}/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
        for d in ("sshd", "lock", "lxc"):
            os.makedirs(f"{root}/run/{d}", exist_ok=True)
        os.chdir(root)
        os.makedirs(".oldroot", exist_ok=True)
        check(libc.syscall(spec["sys_pivot_root"], b".", b".oldroot"), "pivot_root")
        os.chdir("/")
        check(libc.umount2(b"/.oldroot", MNT_DETACH), "umount old root")
        os.rmdir("/.oldroot")
        null = os.open("/dev/null", os.O_RDWR)
        for n in (0, 1, 2):
            os.dup2(null, n)
        # no fd from outside the host root may survive (CRIU refuses to dump them)
        os.closerange(3, wfd)
        os.closerange(wfd + 1, 1 << 16)
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "container": "ctweb-lab",
        }
        os.execve("/usr/bin/python3", ["/usr/bin/python3", "/usr/local/sbin/ctweb-lab-init"], env)
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent
        try:
            os.write(wfd, f"host {spec['hostname']} failed to start: {exc!r}\n".encode())
        finally:
            os._exit(1)
    return 1


def _start_host(hdir: Path, name: str, root: Path, cgroups: list[dict]) -> int:
    nr = SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise LabError(f"pivot_root syscall number unknown for {platform.machine()}")
    spec = {
        "root": str(root),
        "netns": f"/run/netns/{_netns(name)}",
        "hostname": name,
        "cgroups": cgroups,
        "sys_pivot_root": nr,
    }
    proc = subprocess.run(
        [sys.executable, "-I", str(Path(__file__).resolve()), "_launch", json.dumps(spec)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        close_fds=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise LabError(f"{name}: launch failed:\n{proc.stderr.strip()}")
    pid = int(proc.stdout.split()[-1])
    start = _proc_starttime(pid)
    if start is None:
        raise LabError(f"{name}: init (pid {pid}) died at once; see {root}/var/log/ctweb-lab-init.log")
    _write(hdir / "pid", f"{pid} {start}\n")
    return pid


def _ssh_banner(addr: str, timeout: float = 2.0) -> str | None:
    try:
        with socket.create_connection((addr, SSH_PORT), timeout=timeout) as s:
            s.settimeout(timeout)
            data = s.recv(256)
        return data.decode(errors="replace").strip() if data.startswith(b"SSH-") else None
    except OSError:
        return None


def _host_key(root: Path) -> str:
    return " ".join((root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2])


def _raise_pipe_max_size() -> None:
    p = Path("/proc/sys/fs/pipe-max-size")
    cur = int(p.read_text())
    if cur < PIPE_MAX_SIZE:
        try:  # the first lab up keeps the machine's value; another one racing it leaves it be
            fd = os.open(PIPE_ORIG, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(f"{cur}\n")
        p.write_text(str(PIPE_MAX_SIZE))
        _say(f"fs.pipe-max-size {cur} -> {PIPE_MAX_SIZE} (restored by down)")


def up(n_hosts: int = 2, authorized_key: str | None = None) -> list[dict]:
    """Start hosts lab-a, lab-b, ... (idempotent; completes a half-finished up).

    Returns one dict per host: name, address, port, username ("root"),
    host_key ("ssh-ed25519 AAAA..."), pid (the host init's pid in the root namespace).
    ``authorized_key`` (one OpenSSH public key line) is added to root's authorized_keys
    on every host (keys added by earlier calls stay until down()).
    """
    require_root()
    if not 1 <= n_hosts <= MAX_HOSTS:
        raise LabError(f"n_hosts must be 1..{MAX_HOSTS}")
    subnet()  # validate CTWEB_LAB_SUBNET before touching anything
    btrfs = btrfs_hosts()
    t0 = time.monotonic()
    build_rootfs()
    _raise_pipe_max_size()
    _ensure_root_bridge()
    result = []
    for i in range(n_hosts):
        name = host_name(i)
        hdir = hosts_dir() / name
        hdir.mkdir(parents=True, exist_ok=True)
        pid = _alive_pid(hdir)
        if pid is None:
            root = _prepare_host_root(hdir, name)
            if name in btrfs:
                _ensure_btrfs(hdir, root, name)
        else:
            root = hdir / "root"
        _configure_host_root(root, name, i, n_hosts, authorized_key)
        _ensure_host_network(name, i)
        if pid is None:
            old = hdir / "cgroups.json"
            if old.exists():  # left over from a crashed host: start clean
                for cg in json.loads(old.read_text()):
                    _remove_cgroup_tree(Path(cg["path"]))
            cgroups = _make_host_cgroups(hdir, name)
            pid = _start_host(hdir, name, root, cgroups)
            _say(f"{name}: init pid {pid}")
        else:
            _say(f"{name}: already running (pid {pid})")
        result.append(
            {
                "name": name,
                "address": host_address(i),
                "port": SSH_PORT,
                "username": "root",
                "host_key": _host_key(root),
                "pid": pid,
            }
        )
    deadline = time.monotonic() + 30
    for h in result:
        while _ssh_banner(h["address"], 1.0) is None:
            if time.monotonic() > deadline:
                raise LabError(
                    f"{h['name']}: sshd does not answer on {h['address']}:{SSH_PORT}; see {hosts_dir()}/{h['name']}/root/var/log/sshd.log"
                )
            time.sleep(0.2)
        _say(f"{h['name']}: sshd answers on {h['address']}:{SSH_PORT}")
    _say(f"up: {n_hosts} host(s) in {time.monotonic() - t0:.1f}s")
    return result


def _proxy_pidfile() -> Path:
    return instance_dir() / "apt-proxy.pid"


def _start_apt_proxy() -> int:
    """The lab's package proxy (lab/apt_proxy.py) on the bridge address, once per instance."""
    pidfile = _proxy_pidfile()
    try:
        pid_s, start = pidfile.read_text().split()
        rec = (int(pid_s), start)
    except (OSError, ValueError):
        rec = None
    if rec and _proc_starttime(rec[0]) == rec[1]:
        return rec[0]
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    log = open(instance_dir() / "apt-proxy.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-I", str(Path(__file__).with_name("apt_proxy.py")), bridge_address(), str(APT_PROXY_PORT)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        close_fds=True,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((bridge_address(), APT_PROXY_PORT), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"the lab's apt proxy did not start; see {instance_dir() / 'apt-proxy.log'}") from None
            time.sleep(0.1)
    _write(pidfile, f"{proc.pid} {_proc_starttime(proc.pid)}\n")
    _say(f"apt proxy pid {proc.pid} on {bridge_address()}:{APT_PROXY_PORT}")
    return proc.pid


def _stop_apt_proxy() -> None:
    pidfile = _proxy_pidfile()
    try:
        pid_s, start = pidfile.read_text().split()
    except (OSError, ValueError):
        return
    if _proc_starttime(int(pid_s)) == start:
        _say(f"stopping apt proxy pid {pid_s}")
        os.kill(int(pid_s), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while _proc_starttime(int(pid_s)) == start and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            os.waitpid(int(pid_s), os.WNOHANG)  # our child when this process started it
        except ChildProcessError:
            pass
    pidfile.unlink(missing_ok=True)


def up_bare(authorized_key: str) -> dict:
    """Start the bare host lab-z (idempotent): its own namespaces and container bridge like any
    lab host, but a root with only sshd, python3 and apt sources that reach the Debian registry
    through the lab's package proxy. Returns the same dict as up() does for a host."""
    require_root()
    subnet()
    t0 = time.monotonic()
    build_bare_rootfs()
    _raise_pipe_max_size()
    _ensure_root_bridge()
    _start_apt_proxy()
    index = BARE_HOST_INDEX
    name = host_name(index)
    hdir = hosts_dir() / name
    hdir.mkdir(parents=True, exist_ok=True)
    pid = _alive_pid(hdir)
    root = hdir / "root" if pid else _prepare_bare_root(hdir, name)
    if (root / HOST_STAMP).exists():
        raise LabError(f"{name} runs as a full lab host already; down() first")
    _configure_bare_root(root, name, index, authorized_key)
    _ensure_host_network(name, index)
    if pid is None:
        old = hdir / "cgroups.json"
        if old.exists():
            for cg in json.loads(old.read_text()):
                _remove_cgroup_tree(Path(cg["path"]))
        pid = _start_host(hdir, name, root, _make_host_cgroups(hdir, name))
    addr = host_address(index)
    deadline = time.monotonic() + 30
    while _ssh_banner(addr, 1.0) is None:
        if time.monotonic() > deadline:
            raise LabError(f"{name}: sshd does not answer on {addr}:{SSH_PORT}; see {root}/var/log/sshd.log")
        time.sleep(0.2)
    _say(f"up_bare: {name} in {time.monotonic() - t0:.1f}s")
    return {
        "name": name,
        "address": addr,
        "port": SSH_PORT,
        "username": "root",
        "host_key": _host_key(root),
        "pid": pid,
        "bare": True,
    }


# ---------------------------------------------------------------- down / status


def _stop_pid(pid: int, start: str, name: str) -> None:
    """SIGKILL the host's init -- the pid we recorded, if it is still the same process.
    The kernel then kills every process of the host's pid namespace (containers too);
    the init ignores SIGTERM like any init, so there is no gentler stop."""
    if _proc_starttime(pid) != start:
        return
    _say(f"{name}: SIGKILL to init pid {pid}")
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if _proc_starttime(pid) != start:
            return
        time.sleep(0.05)
    raise LabError(f"{name}: init pid {pid} does not die")


def _lab_links() -> list[str]:
    out = _run(["ip", "-o", "link", "show"]).stdout
    names = [line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines()]
    return [n for n in names if n.startswith(LINK_PREFIX) or n == ROOT_BRIDGE]


def _lab_netns() -> list[str]:
    d = Path("/run/netns")
    return sorted(p.name for p in d.iterdir() if p.name.startswith(NETNS_PREFIX)) if d.is_dir() else []


def _any_lab_netns() -> bool:
    """Does any lab instance on this machine (this one included) still have a namespace?"""
    d = Path("/run/netns")
    return d.is_dir() and any(p.name.startswith(ANY_NETNS_PREFIX) for p in d.iterdir())


def down() -> None:
    """Stop the lab's hosts (by recorded pid only) and remove every trace of them
    (namespaces, links, bridge, mounts, cgroups, per-host copies).  Keeps the rootfs
    cache.  Safe on a half-built or already removed lab."""
    require_root()
    t0 = time.monotonic()
    _stop_apt_proxy()
    hosts = hosts_dir()
    hdirs = sorted(p for p in hosts.iterdir() if p.is_dir()) if hosts.is_dir() else []
    stuck = []
    for hdir in hdirs:
        rec = _read_pidfile(hdir)
        if rec:
            try:
                _stop_pid(rec[0], rec[1], hdir.name)
            except LabError as exc:
                stuck.append(str(exc))
    for ns in _lab_netns():
        _say(f"deleting netns {ns}")
        _run(["ip", "netns", "del", ns], check=False)
    for link in _lab_links():
        _say(f"deleting link {link}")
        _run(["ip", "link", "del", link], check=False)
    d = Path("/run/netns")
    # The lab made /run/netns: the last instance's down removes it (the marker stays while
    # another instance's namespaces are there, so that instance's down still does).
    if NETNS_DIR_MARKER.exists() and not (d.is_dir() and any(d.iterdir())):
        while d.is_dir() and _mounts_under(d):  # iproute2 bind-mounts it onto itself (maybe twice)
            if _run(["umount", str(d)], check=False).returncode != 0:
                break
        try:
            d.rmdir()
        except OSError:
            pass
        NETNS_DIR_MARKER.unlink()
    for hdir in hdirs:
        cgfile = hdir / "cgroups.json"
        if cgfile.exists():
            for cg in json.loads(cgfile.read_text()):
                _remove_cgroup_tree(Path(cg["path"]))
    if stuck:  # never delete the root of a host that still runs
        raise LabError("down incomplete: " + "; ".join(stuck))
    _umount_all_under(hosts)
    if hosts.exists():
        _say(f"removing {hosts}")
        _rmtree(hosts)
    if PIPE_ORIG.exists() and not _any_lab_netns():  # the last instance on the machine restores it
        Path("/proc/sys/fs/pipe-max-size").write_text(PIPE_ORIG.read_text().strip())
        PIPE_ORIG.unlink()
        _say("fs.pipe-max-size restored")
    _say(f"down in {time.monotonic() - t0:.1f}s")


def status() -> list[dict]:
    """One dict per host directory: name, address, pid (or None), running, sshd."""
    base = hosts_dir()
    out = []
    for hdir in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
        name = hdir.name
        index = ord(_letter(name)) - ord("a")
        pid = _alive_pid(hdir)
        addr = host_address(index)
        banner = _ssh_banner(addr) if pid else None
        out.append(
            {"name": name, "address": addr, "port": SSH_PORT, "pid": pid, "running": pid is not None, "sshd": banner}
        )
    return out


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "_launch":
    sys.exit(_launch(json.loads(sys.argv[2])))
