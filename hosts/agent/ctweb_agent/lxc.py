"""LXC containers on this host: their directories and configs, the config allowlist
(docs/SECURITY.md), states, networks, lxc-start/lxc-stop."""

import ipaddress
import json
import os
import re
import select
import shutil
import stat
import subprocess
import time

from . import state as S
from .common import _NOFOLLOW_DIR, CHILD_UMASK, AgentError, check_name, event, run


def _templates():
    found = []
    if (
        shutil.which("lxc-create")
        and os.path.exists("/usr/share/lxc/templates/lxc-busybox")
        and shutil.which("busybox")
    ):
        found.append("busybox")
    if os.path.isdir(os.path.join(S.CTWEB_PATH, "templates", "debian", "rootfs")):
        found.append("debian")
    return found


def _network():
    """The container network ctweb may assign addresses in: /etc/ctweb/network.json
    ({"subnet": "10.1.2.0/24", "bridge": "lxcbr0", "range": [100, 250], "gateway": null})."""
    try:
        with open("/etc/ctweb/network.json") as f:
            net = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(net, dict) or "subnet" not in net or "bridge" not in net:
        return None
    net["bridge_present"] = os.path.isdir(f"/sys/class/net/{net['bridge']}/bridge")
    return net


# --- containers (LXC) ----------------------------------------------------------------

INIT_PATH = "ctweb/init"  # inside the container's rootfs: runs the `command` as its init
DROP_CONFIG_PREFIXES = ("lxc.apparmor.", "lxc.net.")
# Bind mounts of host libraries break CRIU restores (mount-v2 move_mount, docs/LAB-NOTES.md); the
# static busybox needs none of them.
DROP_MOUNT_TARGETS = ("lib", "usr/lib", "lib64", "usr/lib64", "sys/kernel/security")


def _cdir(name):
    return os.path.join(S.LXC_PATH, name)


def _config_path(name):
    return os.path.join(_cdir(name), "config")


def _exists(name):
    return os.path.isfile(_config_path(name))


def _read_lines(path):
    """A config's lines, never through a symlink planted in its place."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, errors="replace") as f:
        return f.read().splitlines()


def _read_config(name):
    return _read_lines(_config_path(name))


def _config_value(lines, key):
    for line in lines:
        k, sep, v = line.partition("=")
        if sep and k.strip() == key:
            return v.strip()
    return None


def _write_config_in(directory, lines):
    """Write directory/config via config.tmp created O_EXCL|O_NOFOLLOW relative to the
    directory's own descriptor, then renamed: a planted symlink is never followed."""
    dfd = os.open(directory, _NOFOLLOW_DIR)
    try:
        for _ in range(2):
            try:
                fd = os.open(
                    "config.tmp",
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                    0o600,
                    dir_fd=dfd,
                )
                break
            except FileExistsError:
                st = os.stat("config.tmp", dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    raise AgentError(f"Refusing to write {directory}/config: config.tmp is not a plain file.") from None
                os.unlink("config.tmp", dir_fd=dfd)  # a stale tmp of an interrupted write
        else:
            raise AgentError(f"Cannot create {directory}/config.tmp.")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename("config.tmp", "config", src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def _write_config(name, lines):
    _write_config_in(_cdir(name), lines)


# --- configs from an allowlist (docs/SECURITY.md) ----------------------------------------
# A config that came from another host, from a snapshot, or from the filesystem unvetted is
# never used as it is: the agent writes the container's config itself, from the baseline its
# own templates + _configure give a container here (name, rootfs, console log, capabilities,
# network of this host) plus only the keys that act inside the container. Every other key
# (hooks, net scripts, includes, bind mounts of host paths, device or cgroup placement,
# apparmor/seccomp/selinux, logs at host paths, rootfs elsewhere, namespaces shared with the
# host, sysctls, prlimits, autostart ...) is dropped and named.

BASE_CAP_DROP = ("sys_module", "mac_admin", "mac_override", "sys_time")
MOUNT_AUTO_OK = ("cgroup:mixed", "cgroup:ro", "proc:mixed", "sys:ro")
MOUNT_FSTYPES_OK = ("tmpfs", "mqueue")
MOUNT_OPT_RE = re.compile(
    r"^(defaults|ro|rw|nosuid|nodev|noexec|relatime|noatime|nodiratime|optional|create=(dir|file)"
    r"|(size|mode|uid|gid|nr_inodes|nr_blocks)=[0-9a-zA-Z%]+)$"
)
SAFE_VALUE_RE = re.compile(r"^[^\x00-\x1f\x7f]*$")
SIMPLE_KEYS = {
    # key: value pattern (all act inside the container only)
    "lxc.signal.halt": r"SIG[A-Z0-9+]+|\d{1,2}",
    "lxc.signal.reboot": r"SIG[A-Z0-9+]+|\d{1,2}",
    "lxc.signal.stop": r"SIG[A-Z0-9+]+|\d{1,2}",
    "lxc.tty.max": r"\d{1,3}",
    "lxc.pty.max": r"\d{1,4}",
    "lxc.autodev": r"[01]",
    "lxc.arch": r"[a-z0-9_]{1,16}",
    "lxc.init.cmd": r"/[A-Za-z0-9_./ =:-]{0,255}",
    "lxc.execute.cmd": r"/[A-Za-z0-9_./ =:-]{0,255}",
    "lxc.init.cwd": r"/[A-Za-z0-9_./-]{0,255}",
    "lxc.init.uid": r"\d{1,10}",
    "lxc.init.gid": r"\d{1,10}",
    "lxc.init.groups": r"\d{1,10}(,\d{1,10})*",
    "lxc.environment": r"[A-Za-z_][A-Za-z0-9_]{0,127}(=[^\x00-\x1f\x7f]{0,4096})?",
    "lxc.no_new_privs": r"[01]",
    "lxc.console.path": r"none",
    "lxc.idmap": r"[ug] \d{1,10} \d{1,10} \d{1,10}",  # only ever narrows a privileged template
}
CGROUP_KEY_RE = re.compile(
    r"^lxc\.cgroup2?\.((memory|cpu|cpuacct|cpuset|pids|io|blkio|hugetlb)\.[a-z0-9_.]+|devices\.deny)$"
)


def _host_network():
    """The container network this host's admin set up (/etc/ctweb/network.json, what the
    dashboard knows of it), else the bridge of the host's LXC default config."""
    net = _network() or {}
    if not net.get("bridge"):
        try:
            for line in _read_lines("/etc/lxc/default.conf"):
                k, _, v = line.partition("=")
                if k.strip() == "lxc.net.0.link":
                    net["bridge"] = v.strip()
        except OSError:
            pass
    return net


def _mount_entry_ok(value):
    parts = value.split()
    if len(parts) < 4 or len(parts) > 6:
        return False
    source, target, fstype, opts = parts[:4]
    if fstype not in MOUNT_FSTYPES_OK or source.startswith("/") or "/" in source:
        return False
    if target.startswith("/") or ".." in target.split("/"):
        return False
    return all(MOUNT_OPT_RE.match(o) for o in opts.split(","))


def _trusted_network(lines, network):
    """(the lxc.net lines to write, the address used): veth on this host's own bridge with an
    address of its network, or no network at all."""
    if network:
        ipv4, prefix, gateway, bridge = (
            network["ipv4"],
            int(network["prefix"]),
            network.get("gateway"),
            network["bridge"],
        )
    else:
        host = _host_network()
        addr = _config_value(lines, "lxc.net.0.ipv4.address") or ""
        bridge = host.get("bridge") or ""
        if _config_value(lines, "lxc.net.0.type") != "veth" or not addr or not bridge:
            return ["lxc.net.0.type = empty"]
        try:
            iface = ipaddress.ip_interface(addr if "/" in addr else addr + "/24")
        except ValueError:
            return ["lxc.net.0.type = empty"]
        if iface.version != 4:
            return ["lxc.net.0.type = empty"]
        subnet = host.get("subnet")
        if subnet:
            net = ipaddress.ip_network(subnet, strict=False)
            if iface.ip not in net:
                return ["lxc.net.0.type = empty"]
            prefix = net.prefixlen
        else:
            prefix = iface.network.prefixlen
        ipv4 = str(iface.ip)
        gateway = host.get("gateway")
        if not gateway:
            g = _config_value(lines, "lxc.net.0.ipv4.gateway")
            try:
                gateway = str(ipaddress.ip_address(g)) if g and ipaddress.ip_address(g) in iface.network else None
            except ValueError:
                gateway = None
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", bridge or ""):
        return ["lxc.net.0.type = empty"]
    out = [
        "lxc.net.0.type = veth",
        f"lxc.net.0.link = {bridge}",
        "lxc.net.0.flags = up",
        "lxc.net.0.name = eth0",
        f"lxc.net.0.hwaddr = {_hwaddr(ipv4)}",
        f"lxc.net.0.ipv4.address = {ipv4}/{prefix}",
    ]
    if gateway:
        out.append(f"lxc.net.0.ipv4.gateway = {gateway}")
    return out


def _allowlisted(name, lines, network=None):
    """(the config ctweb writes for `name` on this host from `lines`, the keys dropped)."""
    cdir = _cdir(name)
    dropped = []
    kept = []
    template = ""
    caps = list(BASE_CAP_DROP)
    mount_auto = []
    for line in lines:
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            m = re.fullmatch(r"# ctweb template=([a-z0-9-]{1,32})", s)
            if m:
                template = m.group(1)
            continue
        key, sep, value = s.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not SAFE_VALUE_RE.match(value):
            dropped.append(key or s[:60])
            continue
        if key == "lxc.rootfs.path":
            if value not in (f"dir:{cdir}/rootfs", f"{cdir}/rootfs"):
                dropped.append(key)
            continue
        if key == "lxc.uts.name":
            if value.strip('"') != name:
                dropped.append(key)
            continue
        if key == "lxc.console.logfile":
            if value != os.path.join(cdir, "console.log"):
                dropped.append(key)
            continue
        if key == "lxc.cap.drop":
            names = value.split()
            if not names or not all(re.fullmatch(r"[a-z_]{1,32}", c) for c in names):
                dropped.append(key)  # an empty cap.drop would clear the template's drops
                continue
            caps += [c for c in names if c not in caps]
            continue
        if key == "lxc.mount.auto":
            for tok in value.split():
                if tok in MOUNT_AUTO_OK and tok not in mount_auto:
                    mount_auto.append(tok)
                elif tok not in MOUNT_AUTO_OK:
                    dropped.append(f"lxc.mount.auto ({tok})")
            continue
        if key == "lxc.mount.entry":
            if _mount_entry_ok(value) and _mount_target(s) not in DROP_MOUNT_TARGETS:
                kept.append(f"{key} = {value}")
            else:
                dropped.append(f"lxc.mount.entry ({value.split()[1] if len(value.split()) > 1 else value})")
            continue
        if key.startswith("lxc.net."):
            continue  # rebuilt below from this host's network; differences are named there
        pattern = SIMPLE_KEYS.get(key)
        if (pattern and re.fullmatch(pattern, value)) or (
            CGROUP_KEY_RE.match(key) and re.fullmatch(r"[A-Za-z0-9 .:,_*-]{0,256}", value)
        ):
            kept.append(f"{key} = {value}")
            continue
        dropped.append(key)
    net = _trusted_network(lines, network)
    given = {}
    for line in lines:
        k, sep, v = line.partition("=")
        if sep and k.strip().startswith("lxc.net."):
            given.setdefault(k.strip(), v.strip())
    written = {ln.partition("=")[0].strip(): ln.partition("=")[2].strip() for ln in net}
    for k, v in given.items():
        if k in written and (written[k] == v or k == "lxc.net.0.hwaddr"):
            continue
        if k == "lxc.net.0.ipv4.address" and written.get(k, "").split("/")[0] == v.split("/")[0]:
            continue
        if k == "lxc.net.0.ipv4.gateway" and k not in written:
            continue
        dropped.append(k)
    out = ["# written by ctweb from its allowlist (docs/SECURITY.md); keys from elsewhere are dropped"]
    if template:
        out.append(f"# ctweb template={template}")
    out += [
        f"lxc.rootfs.path = dir:{cdir}/rootfs",
        f"lxc.uts.name = {name}",
        "lxc.console.logfile = {}".format(os.path.join(cdir, "console.log")),
        "lxc.cap.drop = " + " ".join(caps),
    ]
    if mount_auto:
        out.append("lxc.mount.auto = " + " ".join(mount_auto))
    out += kept + net
    seen = []
    for d in dropped:
        if d not in seen:
            seen.append(d)
    return out, seen


def _apply_allowlist(directory, name, lines, what, network=None):
    """Rewrite directory/config from the allowlist; names what was dropped in an event."""
    out, dropped = _allowlisted(name, lines, network)
    if dropped:
        event("config", "dropped from {}: {}".format(what, ", ".join(dropped)), config_dropped=dropped)
    _write_config_in(directory, out)
    return dropped


def _mount_target(line):
    k, _, v = line.partition("=")
    if k.strip() != "lxc.mount.entry":
        return None
    parts = v.split()
    return parts[1].strip("/") if len(parts) > 1 else None


def _state(name):
    rc, out, err = run(["lxc-info", "-n", name, "-s", "-H"], timeout=20)
    return out.strip() or "UNKNOWN" if rc == 0 else "UNKNOWN"


def _ips(name):
    rc, out, err = run(["lxc-info", "-n", name, "-i", "-H"], timeout=20)
    ips = [line.strip() for line in out.splitlines() if line.strip()] if rc == 0 else []
    return [ip for ip in ips if ":" not in ip], [ip for ip in ips if ":" in ip]


def _hwaddr(ipv4):
    # Derived from the address, so the container keeps its MAC on every host.
    octets = [int(o) for o in ipv4.split(".")]
    return "02:c7:{:02x}:{:02x}:{:02x}:{:02x}".format(*tuple(octets))


def _console_tail(name, lines=30):
    for fname in ("console.log", "lxc.log"):
        path = os.path.join(_cdir(name), fname)
        try:
            with open(path, errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
        except OSError:
            continue
        if tail:
            return "{}:\n{}".format(fname, "\n".join(tail))
    return ""


def _shell_quote(arg):
    return "'" + arg.replace("'", "'\"'\"'") + "'"


def _configure(name, template, command, network):
    lines = []
    for line in _read_config(name):
        key = line.partition("=")[0].strip()
        if key.startswith(DROP_CONFIG_PREFIXES):
            continue
        if _mount_target(line) in DROP_MOUNT_TARGETS:
            continue
        if key in ("lxc.init.cmd", "lxc.console.logfile"):
            continue
        lines.append(line)
    lines.append(f"# ctweb template={template}")
    lines.append("lxc.console.logfile = {}".format(os.path.join(_cdir(name), "console.log")))
    if network:
        lines += [
            "lxc.net.0.type = veth",
            "lxc.net.0.link = {}".format(network["bridge"]),
            "lxc.net.0.flags = up",
            "lxc.net.0.name = eth0",
            "lxc.net.0.hwaddr = {}".format(_hwaddr(network["ipv4"])),
            f"lxc.net.0.ipv4.address = {network['ipv4']}/{int(network['prefix'])}",
        ]
        if network.get("gateway"):
            lines.append("lxc.net.0.ipv4.gateway = {}".format(network["gateway"]))
    else:
        lines.append("lxc.net.0.type = empty")
    if command:
        rootfs = _config_value(lines, "lxc.rootfs.path") or ""
        rootfs = rootfs.split(":", 1)[1] if rootfs.startswith("dir:") else rootfs
        init = os.path.join(rootfs, INIT_PATH)
        os.makedirs(os.path.dirname(init), exist_ok=True)
        with open(init, "w") as f:
            # exec: the command becomes the container's pid 1, each argument literal.
            f.write("#!/bin/sh\nexec {}\n".format(" ".join(_shell_quote(a) for a in command)))
        os.chmod(init, 0o755)
        lines.append("lxc.init.cmd = /" + INIT_PATH)
    _apply_allowlist(_cdir(name), name, lines, f"{name}'s template config", network)


def _check_network(network):
    if network is None:
        return None
    if not isinstance(network, dict):
        raise AgentError("Bad network parameters.")
    ipv4 = network.get("ipv4", "")
    if not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", ipv4 or "") or any(int(o) > 255 for o in ipv4.split(".")):
        raise AgentError(f"Bad container address {ipv4!r}.")
    bridge = network.get("bridge") or ""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", bridge):
        raise AgentError(f"Bad bridge name {bridge!r}.")
    if not os.path.isdir(f"/sys/class/net/{bridge}/bridge"):
        raise AgentError(f"This host has no bridge {bridge} for container networks.")
    gateway = network.get("gateway")
    if gateway and not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", gateway):
        raise AgentError(f"Bad gateway {gateway!r}.")
    return {"ipv4": ipv4, "prefix": int(network.get("prefix", 24)), "bridge": bridge, "gateway": gateway}


def _lxc_start(name):
    log = os.path.join(_cdir(name), "lxc.log")
    with open(os.devnull, "rb") as devnull, open(log, "ab") as out:
        # -d: lxc-start daemonizes; its output goes to a file, never to our pipes.
        p = subprocess.run(
            ["lxc-start", "-n", name, "-d", "-o", log, "-l", "INFO"],
            umask=CHILD_UMASK,
            stdin=devnull,
            stdout=out,
            stderr=subprocess.STDOUT,
            close_fds=True,
            timeout=60,
        )
    if p.returncode != 0:
        raise AgentError(f"lxc-start failed for {name}.", _console_tail(name), {"state": _state(name)})
    run(["lxc-wait", "-n", name, "-s", "RUNNING|STOPPED", "-t", "15"], timeout=30)
    if not _init_comes_up(name):
        # Its init exited: LXC stops the container; the console log says why.
        run(["lxc-wait", "-n", name, "-s", "STOPPED", "-t", "10"], timeout=30)
        raise AgentError(
            f"{name} stopped right after it started (its init exited).", _console_tail(name), {"state": _state(name)}
        )
    return "RUNNING"


# A start watches the container's init until it settles or exits, never for a fixed time.
# Settled: it runs its own program (no longer LXC's code, which it leaves by exec) and
# waits for something (a child, a socket, a timer: state S). An init that exits at once
# (a missing program, a command that fails) never gets there; its exit is an event (a
# pidfd). One that computes without ever waiting is taken as running after this bound.
INIT_WATCH_S = 1.5
PF_EXITING = 0x4  # include/linux/sched.h: the task is on its way out


def _proc_stat(pid):
    """(state, ppid, flags) from /proc/PID/stat, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            tail = f.read().rpartition(")")[2].split()
        return tail[0], int(tail[1]), int(tail[6])
    except (OSError, IndexError, ValueError):
        return None


def _exe_id(pid):
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _init_settled(pid):
    """True once the init waits in its own program, False while it works (or is still LXC's
    child before its exec), None once it is gone or exiting."""
    st = _proc_stat(pid)
    if st is None or st[0] in ("Z", "X") or st[2] & PF_EXITING:
        return None
    state, ppid, _ = st
    if state != "S":
        return False
    own = _exe_id(pid)
    return own is not None and own != _exe_id(ppid)  # the parent is the LXC monitor (lxc-start)


def _init_pid(name):
    rc, out, err = run(["lxc-info", "-n", name, "-pH"], timeout=20)
    return int(out.strip()) if rc == 0 and out.strip().isdigit() else None


def align_address(name):
    """After a stateful restore: give the container's interface the address, MAC and default
    route its config names. CRIU brings back the network namespace as it was dumped, so a
    snapshot imported as a new container, or taken before the container's address changed,
    would otherwise come back with the old address (which another container may hold).
    Returns {"from": [...], "to": "a.b.c.d"} when it changed anything, else None."""
    lines = _read_config(name)
    if _config_value(lines, "lxc.net.0.type") != "veth":
        return None
    want = _config_value(lines, "lxc.net.0.ipv4.address") or ""
    if not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}/\d{1,2}", want):
        return None
    dev = _config_value(lines, "lxc.net.0.name") or "eth0"
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", dev):
        return None
    pid = _init_pid(name)
    if pid is None:
        raise AgentError(f"{name} has no init process after its restore.")
    ns = ["nsenter", f"--net=/proc/{pid}/ns/net", "ip"]
    rc, out, err = run(ns + ["-4", "-o", "addr", "show", "dev", dev], timeout=20)
    if rc != 0:
        raise AgentError(f"Cannot read the address of {name}'s {dev} after its restore.", (err or out)[-500:])
    have = [w for ln in out.splitlines() for a, w in zip(ln.split(), ln.split()[1:], strict=False) if a == "inet"]
    hwaddr = _config_value(lines, "lxc.net.0.hwaddr")
    if want in have:
        return None
    try:
        net = ipaddress.IPv4Interface(want).network
    except ValueError:
        return None
    # Only what stands for the config's address: those in its subnet, or else the first (the
    # address LXC gave it where it was dumped, in another network); an address the container's
    # own processes added in another network stays.
    stale = [a for a in have if _in_network(a, net)] or have[:1]
    steps = []
    if hwaddr and re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", hwaddr):
        steps.append(["link", "set", "dev", dev, "address", hwaddr])
    # The old ones go first: deleting a subnet's primary address takes its secondaries with it
    # (unless promote_secondaries is set), so the new one added before would go too.
    steps += [["addr", "del", old, "dev", dev] for old in stale]
    steps.append(["addr", "replace", want, "dev", dev])
    gateway = _config_value(lines, "lxc.net.0.ipv4.gateway")
    if gateway and re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", gateway):
        steps.append(["route", "replace", "default", "via", gateway, "dev", dev])
    given = False  # whether its address is in place (only the route may be missing then)
    for step in steps:
        rc, out, err = run(ns + step, timeout=20)
        if rc != 0:
            raise AgentError(
                f"Cannot give {name} its address {want} after its restore ({' '.join(step[:2])} failed).",
                (err or out)[-500:],
                data={"address_given": given},
            )
        given = given or step[:2] == ["addr", "replace"]
    return {"from": [a.split("/")[0] for a in stale], "to": want.split("/")[0]}


def _in_network(address, net):
    try:
        return ipaddress.IPv4Interface(address).ip in net
    except ValueError:
        return False


def _init_comes_up(name, limit=INIT_WATCH_S):
    """Watch the container's init until it settles (True) or exits (False)."""
    pid = _init_pid(name)
    if pid is None:
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):  # Python < 3.9 or Linux < 5.3: /proc alone tells
        pidfd = None
    poller = select.poll()
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    deadline = time.monotonic() + limit
    tick_ms = 1
    try:
        while True:
            settled = _init_settled(pid)
            if settled is None:
                return False
            if settled or time.monotonic() >= deadline:
                return True
            if pidfd is None:
                time.sleep(tick_ms / 1000)
            elif poller.poll(tick_ms):  # wakes at once when the init exits
                return False
            tick_ms = min(tick_ms * 2, 16)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _lxc_stop(name):
    if _state(name) == "STOPPED":
        return "STOPPED"
    lines = _read_config(name)
    if _config_value(lines, "lxc.init.cmd") == "/" + INIT_PATH:
        # A plain command as pid 1 has no shutdown handler: end it at once.
        argv = ["lxc-stop", "-n", name, "-k"]
    else:
        argv = ["lxc-stop", "-n", name, "-t", "10"]
    rc, out, err = run(argv, timeout=60)
    state = _state(name)
    if state != "STOPPED":
        raise AgentError(f"lxc-stop did not stop {name}.", (err or out)[-2000:], {"state": state})
    return state


def _require(name):
    check_name(name)
    if not _exists(name):
        raise AgentError(f"There is no container {name} on this host.", data={"state": "UNKNOWN"})
    return name
