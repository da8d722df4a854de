#!/usr/bin/env python3
"""ctweb host agent.

Copied to each host by the dashboard and run there as root with the host's own
python3: `python3 ctweb-agent-<hash>.py SUBCOMMAND`, parameters as one JSON object on
standard input. It prints one JSON object per line: events
({"type": "event", "phase": ..., "message": ..., "progress": ...}), then exactly one
{"type": "result", "data": {...}} or {"type": "error", "message": ..., "details": ...}.

Standard library only, plus what the host's distribution ships (lxc tools, criu,
pycriu). Every argument list is built here from validated values; no shell is used.
"""

import datetime
import errno
import fcntl
import glob
import hashlib
import hmac
import io
import ipaddress
import json
import os
import platform
import re
import select
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import time

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
LXC_PATH = "/var/lib/lxc"
CTWEB_PATH = "/var/lib/ctweb"
SNAPSHOTS_PATH = os.path.join(CTWEB_PATH, "snapshots")  # <container>/<snapshot>/{rootfs,config,images,meta.json}
STATE_PATH = os.path.join(CTWEB_PATH, "state")  # <container>/images: the saved state of a stateful stop
BUNDLES_PATH = os.path.join(CTWEB_PATH, "bundles")  # op-<op>.tar.gz, fetched and deleted by the dashboard
LOCKS_PATH = os.path.join(CTWEB_PATH, "locks")  # <container>.lock: one changing job per container at a time

# Everything the agent itself creates is root-only (umask 077, set in main()); the programs
# it runs (lxc-create's templates, lxc-start and so the container's init, CRIU) keep the
# usual 022, so files made inside containers get their ordinary modes.
AGENT_UMASK = 0o077
CHILD_UMASK = 0o022


def _private_modes():
    """Make ctweb's directories on this host root-only, also those an older version left
    0755: /var/lib/ctweb, its direct subdirectories and their per-container/per-snapshot
    directories (a few chmods, never a walk of any rootfs), and ctweb's own files in them."""
    if not os.path.isdir(CTWEB_PATH) or os.path.islink(CTWEB_PATH):
        return
    todo = [CTWEB_PATH]
    for sub in sorted(os.listdir(CTWEB_PATH)):
        todo.append(os.path.join(CTWEB_PATH, sub))
    for level1 in (SNAPSHOTS_PATH, STATE_PATH, MIGRATIONS_PATH):
        if os.path.isdir(level1) and not os.path.islink(level1):
            for n in os.listdir(level1):
                todo.append(os.path.join(level1, n))
                if level1 == SNAPSHOTS_PATH:
                    d = os.path.join(level1, n)
                    if os.path.isdir(d) and not os.path.islink(d):
                        todo += [os.path.join(d, s) for s in os.listdir(d)]
    for files_in in (LOCKS_PATH, BUNDLES_PATH, os.path.join(CTWEB_PATH, "agent")):
        if os.path.isdir(files_in) and not os.path.islink(files_in):
            todo += [os.path.join(files_in, n) for n in os.listdir(files_in)]
    for path in todo:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            want = stat.S_IMODE(st.st_mode) & 0o700
        elif stat.S_ISREG(st.st_mode):
            want = stat.S_IMODE(st.st_mode) & 0o700
        else:
            continue
        if stat.S_IMODE(st.st_mode) != want:
            try:
                os.chmod(path, want, follow_symlinks=False)
            except (OSError, NotImplementedError):
                pass


# The descriptor of the container's lock while this run holds it (see main()).
LOCK_FD = None
# True once the dashboard's end of stdout is gone: the job goes on to a known state, quietly.
DETACHED = False


class AgentError(Exception):
    def __init__(self, message, details="", data=None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.data = data or {}


def emit(obj):
    global DETACHED
    if DETACHED:
        return
    try:
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        # The dashboard went away (its worker died, its link broke). Stopping half-way
        # would leave the container in a state nobody knows: finish the step instead, and
        # let the dashboard's recovery find the result (it waits for our lock).
        DETACHED = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)


def event(phase, message, progress=None, **extra):
    msg = {"type": "event", "phase": phase, "message": message, "t": time.time()}
    if progress is not None:
        msg["progress"] = progress
    msg.update(extra)
    emit(msg)


def run(argv, timeout=120, check=False, input=None):
    """Run a command from an argument list; return (returncode, stdout, stderr)."""
    try:
        p = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, close_fds=True, umask=CHILD_UMASK
        )
    except FileNotFoundError:
        if check:
            raise AgentError(f"{argv[0]} is not installed on this host.") from None
        return 127, "", f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        if check:
            raise AgentError(f"{argv[0]} did not finish within {timeout} s.") from None
        return 124, "", f"{argv[0]}: timed out"
    if check and p.returncode != 0:
        raise AgentError(
            f"{' '.join(argv[:2])} failed (exit status {p.returncode}).",
            (p.stderr or p.stdout)[-4000:],
        )
    return p.returncode, p.stdout, p.stderr


def check_name(name, what="container"):
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AgentError(f"Invalid {what} name {name!r}.")
    return name


# --- probe ---------------------------------------------------------------------------


def _cpu():
    model, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    return model, flags


def _criu():
    info = {"criu_version": None, "criu_check": "not installed", "criu_check_errors": []}
    if shutil.which("criu") is None:
        return info
    rc, out, err = run(["criu", "--version"], timeout=20)
    m = re.search(r"Version:\s*(\S+)", out + err)
    info["criu_version"] = m.group(1) if m else None
    rc, out, err = run(["criu", "check"], timeout=60)
    text = (out + err).strip()
    info["criu_check"] = "ok" if rc == 0 and "Looks good" in text else "failed"
    info["criu_check_output"] = text.splitlines()[-40:]
    info["criu_check_errors"] = [
        line for line in text.splitlines() if re.search(r"(Error|error|fail|Unexpected|Can't)", line)
    ][-20:]
    features = {}
    for feature in ("mem_dirty_track", "uffd", "uffd-noncoop"):
        rc, out, err = run(["criu", "check", "--feature", feature], timeout=30)
        features[feature] = rc == 0
    info["criu_features"] = features
    info["dirty_tracking"] = features["mem_dirty_track"]
    info["uffd"] = features["uffd"] and features["uffd-noncoop"]
    return info


def _disk(path):
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "/"
    usage = shutil.disk_usage(probe)
    return {"path": path, "free_bytes": usage.free, "total_bytes": usage.total}


def _templates():
    found = []
    if (
        shutil.which("lxc-create")
        and os.path.exists("/usr/share/lxc/templates/lxc-busybox")
        and shutil.which("busybox")
    ):
        found.append("busybox")
    if os.path.isdir(os.path.join(CTWEB_PATH, "templates", "debian", "rootfs")):
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


def cmd_probe(params):
    event("probe", "reading kernel and CPU", 10)
    uname = platform.uname()
    model, flags = _cpu()
    caps = {
        "hostname": socket.gethostname(),
        "kernel": uname.release,
        "uname": " ".join(uname),
        "arch": uname.machine,
        "cpu_model": model,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        with open("/etc/os-release") as f:
            m = re.search(r'^PRETTY_NAME="?([^"\n]*)', f.read(), re.M)
            caps["os"] = m.group(1) if m else ""
    except OSError:
        caps["os"] = ""
    event("probe", "running criu check", 30)
    caps.update(_criu())
    event("probe", "checking LXC and pycriu", 70)
    lxc_version = None
    if shutil.which("lxc-start"):
        rc, out, err = run(["lxc-start", "--version"], timeout=20)
        lxc_version = (out or err).strip() or None
    caps["lxc_version"] = lxc_version
    try:
        import pycriu  # noqa: F401

        caps["pycriu"] = True
    except Exception as e:  # pycriu missing or broken: report, don't fail the probe
        caps["pycriu"] = False
        caps["pycriu_error"] = str(e)[:200]
    caps["templates"] = _templates()
    caps["network"] = _network()
    caps["disk"] = [_disk(LXC_PATH), _disk(CTWEB_PATH)]
    # Post-copy pages go through the resumable page relay (CRIU over --ps-socket): its version.
    caps["page_relay"] = RELAY_VERSION
    event("probe", "done", 100)
    return caps


# --- containers (LXC) ----------------------------------------------------------------

INIT_PATH = "ctweb/init"  # inside the container's rootfs: runs the `command` as its init
DROP_CONFIG_PREFIXES = ("lxc.apparmor.", "lxc.net.")
# Bind mounts of host libraries break CRIU restores (mount-v2 move_mount, LAB.md); the
# static busybox needs none of them.
DROP_MOUNT_TARGETS = ("lib", "usr/lib", "lib64", "usr/lib64", "sys/kernel/security")


def _cdir(name):
    return os.path.join(LXC_PATH, name)


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


def _describe(name):
    lines = _read_config(name) if _exists(name) else []
    ipv4, ipv6 = _ips(name)
    configured = _config_value(lines, "lxc.net.0.ipv4.address")
    if not ipv4 and configured:
        ipv4 = [configured.split("/")[0]]
    return {
        "name": name,
        "state": _state(name),
        "ipv4": ipv4,
        "ipv6": ipv6,
        "template": next((line.split("=", 1)[1] for line in lines if line.startswith("# ctweb template=")), ""),
        "command": _config_value(lines, "lxc.init.cmd") == "/" + INIT_PATH,
        "has_saved_state": _has_saved_state(name),
        "snapshots": _snapshot_names(name),
        "config_warnings": _allowlisted(name, lines)[1] if lines else [],
    }


def cmd_list(params):
    names = []
    if os.path.isdir(LXC_PATH):
        names = sorted(n for n in os.listdir(LXC_PATH) if NAME_RE.fullmatch(n) and _exists(n))
    return {"containers": [_describe(n) for n in names], "migrations": _migration_dirs()}


def _migration_dirs():
    """The migrations that left a working directory here (the dashboard removes those whose
    operation has ended): their id, and the container a target side was receiving."""
    out = []
    if os.path.isdir(MIGRATIONS_PATH):
        for d in sorted(os.listdir(MIGRATIONS_PATH)):
            if not d.isdigit():
                continue
            try:
                with open(os.path.join(MIGRATIONS_PATH, d, "receiving")) as f:
                    receiving = f.read().strip()
            except OSError:
                receiving = None
            out.append(
                {"migration": int(d), "receiving": receiving if receiving and NAME_RE.fullmatch(receiving) else None}
            )
    return out


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
    # A command that exits at once stops the container: wait a moment to catch it.
    deadline = time.time() + 1.5
    while time.time() < deadline:
        if _state(name) != "RUNNING":
            break
        time.sleep(0.25)
    state = _state(name)
    if state != "RUNNING":
        raise AgentError(
            f"{name} stopped right after it started (its init exited).", _console_tail(name), {"state": state}
        )
    return state


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


def cmd_create(params):
    name = check_name(params.get("name"))
    template = params.get("template")
    command = params.get("command")
    if command is not None and (not isinstance(command, list) or not all(isinstance(a, str) for a in command)):
        raise AgentError("The command must be a list of strings.")
    network = _check_network(params.get("network"))
    if template not in _templates():
        raise AgentError(
            "This host has no template {!r} (it has: {}).".format(template, ", ".join(_templates()) or "none")
        )
    if os.path.exists(_cdir(name)):
        raise AgentError(f"A container named {name} exists on this host already.")
    event("create", f"creating {name} from {template}", 10)
    try:
        if template == "busybox":
            run(["lxc-create", "-n", name, "-t", "busybox"], timeout=120, check=True)
        else:
            run(["lxc-create", "-n", name, "-t", f"ctweb-{template}"], timeout=300, check=True)
        event("configure", "configuring network and init", 50)
        _configure(name, template, command, network)
        event("start", f"starting {name}", 70)
        state = _lxc_start(name)
    except AgentError as e:
        # Nothing half-created stays behind.
        details = e.details or _console_tail(name)
        _destroy(name)
        raise AgentError(e.message, details) from None
    event("start", f"{name} is {state}", 100)
    return _describe(name)


def _destroy(name):
    if not os.path.exists(_cdir(name)):
        return
    if _exists(name) and _state(name) != "STOPPED":
        run(["lxc-stop", "-n", name, "-k"], timeout=60)
    rc, out, err = run(["lxc-destroy", "-n", name], timeout=120)
    if os.path.exists(_cdir(name)):
        shutil.rmtree(_cdir(name), ignore_errors=True)


def cmd_start(params):
    """{name, discard_state=false}: restores the saved state of a stateful stop when there
    is one (result restored: true + CRIU's restore stats), else a cold start."""
    name = _require(params.get("name"))
    if _state(name) == "RUNNING":
        return _describe(name)
    if params.get("discard_state") and _has_saved_state(name):
        event("start", f"discarding the saved state of {name}", 10)
        _remove_tree(_state_dir(name))
    return _start(name, progress=20)


def _start(name, progress):
    if not _has_saved_state(name):
        event("start", f"starting {name}", progress)
        _lxc_start(name)
        return {**_describe(name), "restored": False}
    t0 = time.monotonic()
    images = _state_images(name)
    dropped = _apply_allowlist(_cdir(name), name, _read_config(name), f"{name}'s config")
    event("restore", f"restoring {name} from its saved state", progress)
    _criu_restore(name, images, failure=f"Restoring {name} from its saved state failed", has_saved_state=True)
    stats = _criu_stats(images, "restore")
    stats["total_ms"] = _ms(t0)
    # The processes run again: the state is spent (restoring it twice would fork the past).
    _remove_tree(_state_dir(name))
    event("restore", f"{name} restored in {stats['total_ms']} ms", 100)
    out = {**_describe(name), "restored": True, "stats": stats}
    if dropped:
        out["config_dropped"] = dropped
    return out


def cmd_stop(params):
    """{name, stateful=false}: stateful dumps the processes (lxc-checkpoint -s) into the
    container's saved state, which the next start restores."""
    name = _require(params.get("name"))
    if not _flag(params, "stateful", False):
        event("stop", f"stopping {name}", 20)
        _lxc_stop(name)
        return _describe(name)
    state = _state(name)
    if state != "RUNNING":
        raise AgentError(f"{name} is {state}: a stateful stop needs a running container.", data={"state": state})
    t0 = time.monotonic()
    _check_disk(_memory_bytes(name), f"the saved state of {name}")
    sdir = _state_dir(name)
    _remove_tree(sdir)  # a stale state of an earlier run (the container runs, so it is spent)
    images = _state_images(name)
    os.makedirs(images)
    event("dump", f"dumping {name} (CRIU) and stopping it", 20)
    try:
        _criu_dump(name, images, stop=True)
    except AgentError as e:
        _remove_tree(sdir)
        e.data.update(state=_state(name), has_saved_state=False)
        e.message += f" {name} is {e.data['state']}; no state was kept."
        raise
    stats = _criu_stats(images, "dump")
    stats["total_ms"] = _ms(t0)
    _write_json(os.path.join(sdir, "meta.json"), {"container": name, "created_at": _now(), "stats": stats})
    state = _state(name)
    if state != "STOPPED":
        # lxc-checkpoint -s said yes but the container runs on: the state is not a stop.
        _remove_tree(sdir)
        raise AgentError(f"{name} still runs after its stateful stop.", data={"state": state})
    event("dump", f"{name} dumped and stopped in {stats['total_ms']} ms", 100)
    return {**_describe(name), "stats": stats, "size_bytes": _du(images)}


def cmd_restart(params):
    name = _require(params.get("name"))
    event("stop", f"stopping {name}", 10)
    _lxc_stop(name)
    return _start(name, progress=50)


def cmd_delete(params):
    name = check_name(params.get("name"))
    if not _exists(name):
        # Already gone from this host (by hand, or a lost host copy): deleting it succeeds.
        _remove_tree(_state_dir(name))
        _remove_tree(os.path.join(SNAPSHOTS_PATH, name))
        return {"name": name, "state": "STOPPED", "deleted": True, "was_missing": True}
    event("stop", f"stopping {name}", 20)
    _lxc_stop(name)
    event("delete", f"destroying {name}", 60)
    rc, out, err = run(["lxc-destroy", "-n", name], timeout=120)
    if rc != 0 or _exists(name):
        raise AgentError(f"lxc-destroy failed for {name}.", (err or out)[-2000:], {"state": _state(name)})
    event("delete", f"removing the snapshots and saved state of {name}", 80)
    _remove_tree(_state_dir(name))
    _remove_tree(os.path.join(SNAPSHOTS_PATH, name))
    return {"name": name, "state": "STOPPED", "deleted": True}


# --- CRIU: snapshots, stateful stop/start ----------------------------------------------

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
DISK_MARGIN = 64 << 20  # bytes kept free beyond the estimate (logs, metadata, rounding)
LOG_LINE_RE = re.compile(r"\b(Error|Err|Warn|Warning)\b")


def _ms(t0):
    return int(round((time.monotonic() - t0) * 1000))


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")  # noqa: UP017 (3.9 hosts)


def _flag(params, key, default):
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise AgentError(f"{key} must be true or false.")
    return value


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _remove_tree(path):
    # Only ever below /var/lib/ctweb: a wrong path here would be a disaster.
    real = os.path.realpath(path)
    if not real.startswith(CTWEB_PATH + "/") or real.count("/") < 5:
        raise AgentError(f"refusing to remove {path}")
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


def _state_dir(name):
    return os.path.join(STATE_PATH, name)


def _state_images(name):
    return os.path.join(STATE_PATH, name, "images")


def _has_saved_state(name):
    return os.path.isfile(os.path.join(_state_images(name), "inventory.img"))


def _snap_dir(name, snap):
    return os.path.join(SNAPSHOTS_PATH, name, snap)


def _snapshot_names(name):
    base = os.path.join(SNAPSHOTS_PATH, name)
    try:
        names = [
            n for n in os.listdir(base) if NAME_RE.fullmatch(n) and os.path.isfile(os.path.join(base, n, "meta.json"))
        ]
    except OSError:
        return []
    return sorted(names, key=lambda n: os.path.getmtime(os.path.join(base, n, "meta.json")))


def _rootfs(name):
    value = _config_value(_read_config(name), "lxc.rootfs.path") or os.path.join(_cdir(name), "rootfs")
    path = value.split(":", 1)[1] if value.startswith("dir:") else value
    # Only the rootfs LXC keeps for it: a config pointing elsewhere must not make us copy,
    # roll back or delete some other directory of the host.
    if os.path.realpath(path) != os.path.realpath(os.path.join(_cdir(name), "rootfs")) or not os.path.isdir(path):
        raise AgentError(f"{name}'s rootfs is {value!r}; ctweb handles only {_cdir(name)}/rootfs.")
    return path


def _du(path):
    total = 0
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            try:
                total += os.lstat(os.path.join(root, n)).st_blocks * 512
            except OSError:
                pass
    return total


def _memory_bytes(name):
    """Memory the container's cgroup charges now (v1 or v2): what a dump may write."""
    for key in ("memory.usage_in_bytes", "memory.current"):
        rc, out, err = run(["lxc-cgroup", "-n", name, key], timeout=20)
        if rc == 0 and out.strip().isdigit():
            return int(out.strip())
    return 0


def _check_disk(estimate, what):
    os.makedirs(CTWEB_PATH, exist_ok=True)
    need = int(estimate * 1.2) + DISK_MARGIN
    free = shutil.disk_usage(CTWEB_PATH).free
    if free < need:
        raise AgentError(
            f"Not enough disk space for {what}: about {need >> 20} MiB needed under {CTWEB_PATH}, "
            f"{free >> 20} MiB free.",
            data={"needed_bytes": need, "free_bytes": free},
        )
    return need


def _sync(src, dst):
    """Make dst an exact copy of src (ownership, modes, hard links, ACLs, xattrs: file
    capabilities matter). rsync copies only what changed, so a second pass is cheap."""
    os.makedirs(dst, exist_ok=True)
    if shutil.which("rsync"):
        rc, out, err = run(
            ["rsync", "-aHAX", "--numeric-ids", "--delete", src.rstrip("/") + "/", dst.rstrip("/") + "/"], timeout=3600
        )
        if rc not in (0, 24):  # 24: files vanished while we copied (a running container)
            raise AgentError(f"rsync of {src} failed (exit status {rc}).", (err or out)[-3000:])
        return
    shutil.rmtree(dst)
    run(["cp", "-a", "--reflink=auto", src, dst], timeout=3600, check=True)


def _criu_log(images, which, tail=25):
    """The lines of CRIU's log that explain a failure: errors and warnings, then the tail."""
    path = os.path.join(images, f"{which}.log")
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        return f"{which}.log: {e.strerror}"
    picked = [line for line in lines if LOG_LINE_RE.search(line)][-60:]
    rest = [line for line in lines[-tail:] if line not in picked]
    text = "\n".join(picked)
    if rest:
        text += "\n--- last lines of {}.log ---\n{}".format(which, "\n".join(rest))
    return text


def _checkpoint_log(name):
    return os.path.join(_cdir(name), "lxc-checkpoint.log")


def _lxc_checkpoint(name, images, mode, env=None):
    """lxc-checkpoint -n NAME -D IMAGES [-s | -r]. The LXC monitor that a restore leaves
    behind keeps its caller's stdout/stderr: they go to a file, never to our pipes.
    `env` (e.g. CRIU_CONFIG_FILE for lazy pages) is passed to lxc-checkpoint and its criu."""
    argv = ["lxc-checkpoint", "-n", name, "-D", images]
    if mode == "stop":
        argv.append("-s")
    elif mode == "restore":
        argv.append("-r")
    log = _checkpoint_log(name)
    if os.path.exists(log) and os.path.getsize(log) > 1 << 20:
        os.truncate(log, 0)
    # Append: the monitor of an earlier restore may still hold this file open.
    with open(os.devnull, "rb") as devnull, open(log, "ab") as out:
        start = out.tell()
        out.write("--- {} {}\n".format(_now(), " ".join(argv)).encode())
        out.flush()
        # A dump keeps the container's lock even if this agent dies first: nobody may look
        # at (or resume) the container until CRIU has finished with it. A restore must not:
        # its LXC monitor lives as long as the container.
        keep = (LOCK_FD,) if LOCK_FD is not None and mode in ("stop", "dump") else ()
        try:
            p = subprocess.run(
                argv,
                umask=CHILD_UMASK,
                stdin=devnull,
                stdout=out,
                stderr=subprocess.STDOUT,
                close_fds=True,
                pass_fds=keep,
                timeout=900,
                env=env,
            )
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = 124
        except FileNotFoundError:
            raise AgentError("lxc-checkpoint is not installed on this host.") from None
    try:
        with open(log, "rb") as f:
            f.seek(start)
            output = f.read().decode(errors="replace").split("\n", 1)[-1][-3000:]
    except OSError:
        output = ""
    return rc, output


def _criu_dump(name, images, stop):
    what = "dump and stop" if stop else "dump"
    rc, output = _lxc_checkpoint(name, images, "stop" if stop else "dump")
    if rc != 0 or not os.path.isfile(os.path.join(images, "inventory.img")):
        details = _criu_log(images, "dump")
        if output.strip():
            details += "\n--- lxc-checkpoint ---\n" + output.strip()
        state = _state(name)
        msg = f"CRIU could not {what} {name} (lxc-checkpoint exit status {rc})."
        raise AgentError(msg, details, {"state": state, "has_saved_state": _has_saved_state(name)})


def _freezer_state(name):
    rc, out, err = run(["lxc-cgroup", "-n", name, "freezer.state"], timeout=20)
    if rc == 0 and out.strip():
        return out.strip()
    rc, out, err = run(["lxc-cgroup", "-n", name, "cgroup.freeze"], timeout=20)  # cgroup v2
    if rc == 0 and out.strip() in ("0", "1"):
        return "FROZEN" if out.strip() == "1" else "THAWED"
    return None


def _thaw(name):
    """Thaw the container's freezer cgroup. lxc-unfreeze is not enough after a restore:
    CRIU (--manage-cgroups=full) restores the freezer state it dumped -- FROZEN for our
    snapshots, which freeze the container to copy its rootfs consistently -- while LXC
    believes the container RUNNING and does nothing. So write the cgroup file."""
    run(["lxc-unfreeze", "-n", name], timeout=60)
    for _ in range(500):
        state = _freezer_state(name)
        if state in (None, "THAWED"):
            return
        if state == "FROZEN":
            run(["lxc-cgroup", "-n", name, "freezer.state", "THAWED"], timeout=20)
            run(["lxc-cgroup", "-n", name, "cgroup.freeze", "0"], timeout=20)
        time.sleep(0.01)  # FREEZING/THAWING settle within ms
    raise AgentError(f"{name} stays frozen ({_freezer_state(name)}) after a restore.", data={"state": _state(name)})


def _criu_restore(name, images, failure, has_saved_state, env=None):
    rc, output = _lxc_checkpoint(name, images, "restore", env)
    state = _state(name)
    if rc == 0 and state in ("RUNNING", "FROZEN"):
        _thaw(name)
        return
    details = _criu_log(images, "restore")
    if output.strip():
        details += "\n--- lxc-checkpoint ---\n" + output.strip()
    if state != "STOPPED":
        run(["lxc-stop", "-n", name, "-k"], timeout=60)
        state = _state(name)
    raise AgentError(
        f"{failure} (lxc-checkpoint exit status {rc}); {name} is {state}.",
        details,
        {"state": state, "has_saved_state": has_saved_state},
    )


def _criu_stats(images, which):
    """CRIU's stats-dump / stats-restore, decoded with pycriu (times in µs, pages)."""
    try:
        import pycriu

        with open(os.path.join(images, f"stats-{which}"), "rb") as f:
            img = pycriu.images.load(f)
        return dict(img["entries"][0].get(which) or {})
    except Exception as e:
        return {"error": f"stats-{which}: {type(e).__name__}: {e}"}


def _image_files(images):
    out = []
    for n in sorted(os.listdir(images)):
        try:
            st = os.lstat(os.path.join(images, n))
        except OSError:
            continue
        out.append({"name": n, "size": st.st_size})
    return out


def cmd_snapshot(params):
    """{name, snapshot, stateful=true}. Stateful: CRIU dump of the running container
    (it keeps running), plus its rootfs copied while frozen, so files and memory agree."""
    name = _require(params.get("name"))
    snap = check_name(params.get("snapshot"), "snapshot")
    stateful = _flag(params, "stateful", True)
    t0 = time.monotonic()
    final = _snap_dir(name, snap)
    if os.path.lexists(final):
        raise AgentError(f"{name} has a snapshot named {snap} already.", data={"state": _state(name)})
    state = _state(name)
    if state not in ("RUNNING", "STOPPED"):
        raise AgentError(f"{name} is {state}; snapshots need it RUNNING or STOPPED.", data={"state": state})
    if stateful and state != "RUNNING":
        raise AgentError(f"{name} is {state}: a stateful snapshot needs a running container.", data={"state": state})
    rootfs = _rootfs(name)
    event("preflight", "checking disk space", 2)
    rootfs_bytes = _du(rootfs)
    _check_disk(rootfs_bytes + (_memory_bytes(name) if stateful else 0), f"snapshot {snap} of {name}")
    tmp = os.path.join(SNAPSHOTS_PATH, name, f".tmp-{snap}")
    _remove_tree(tmp)
    os.makedirs(tmp)
    images = os.path.join(tmp, "images")
    stats = {}
    frozen_ms = None
    try:
        _write_config_in(tmp, _read_config(name))
        if state == "RUNNING":
            # Bulk copy while it runs; the second pass, frozen, copies only what changed.
            event("copy", f"copying the rootfs of {name} ({rootfs_bytes >> 20} MiB) while it runs", 10)
            _sync(rootfs, os.path.join(tmp, "rootfs"))
            event("freeze", f"freezing {name}", 40)
            t_freeze = time.monotonic()
            run(["lxc-freeze", "-n", name], timeout=60, check=True)
            try:
                if stateful:
                    os.makedirs(images)
                    event("dump", f"dumping {name} with CRIU (it keeps running)", 50)
                    _criu_dump(name, images, stop=False)
                event("copy", "copying what changed in the rootfs while frozen", 75)
                _sync(rootfs, os.path.join(tmp, "rootfs"))
            finally:
                _thaw(name)
                frozen_ms = _ms(t_freeze)
            state = _state(name)
            if state != "RUNNING":
                raise AgentError(f"{name} is {state} after the snapshot, not RUNNING.", data={"state": state})
        else:
            event("copy", f"copying the rootfs of {name} ({rootfs_bytes >> 20} MiB)", 20)
            _sync(rootfs, os.path.join(tmp, "rootfs"))
        if stateful:
            stats = _criu_stats(images, "dump")
        stats["total_ms"] = _ms(t0)
        if frozen_ms is not None:
            stats["frozen_ms"] = frozen_ms  # the container's downtime, dump + frozen copy
        event("copy", "writing metadata", 90)
        meta = {
            "snapshot": snap,
            "container": name,
            "stateful": stateful,
            "created_at": _now(),
            "stats": stats,
            "container_state": state,
        }
        _write_json(os.path.join(tmp, "meta.json"), meta)
        os.rename(tmp, final)
    except AgentError as e:
        _remove_tree(tmp)
        e.data["state"] = _state(name)  # after the thaw
        e.message += f" {name} is {e.data['state']}; no snapshot was kept."
        raise
    except BaseException:
        _remove_tree(tmp)
        raise
    size = _du(final)
    meta["size_bytes"] = size
    _write_json(os.path.join(final, "meta.json"), meta)
    images = os.path.join(final, "images")
    result = {
        **meta,
        "images": _image_files(images) if stateful else [],
        "contents": _contents(images) if stateful else None,
    }
    event("copy", f"snapshot {snap} of {name} done in {stats['total_ms']} ms", 100)
    return result


def _load_snapshot(name, snap):
    sdir = _snap_dir(name, snap)
    meta = _read_json(os.path.join(sdir, "meta.json"))
    if meta is None:
        raise AgentError(f"{name} has no snapshot {snap} on this host.", data={"state": _state(name)})
    return sdir, meta


def cmd_restore(params):
    """{name, snapshot}: kill the container, roll its rootfs (and config) back to the
    snapshot, then restore the processes (stateful) or cold start (stateless)."""
    name = _require(params.get("name"))
    snap = check_name(params.get("snapshot"), "snapshot")
    sdir, meta = _load_snapshot(name, snap)
    images = os.path.join(sdir, "images")
    stateful = bool(meta.get("stateful")) and os.path.isfile(os.path.join(images, "inventory.img"))
    if not os.path.isdir(os.path.join(sdir, "rootfs")):
        raise AgentError(f"Snapshot {snap} of {name} has no rootfs copy.", data={"state": _state(name)})
    rootfs = _rootfs(name)
    t0 = time.monotonic()
    event("stop", f"stopping {name}", 5)
    if _state(name) != "STOPPED":
        rc, out, err = run(["lxc-stop", "-n", name, "-k"], timeout=60)
        state = _state(name)
        if state != "STOPPED":
            raise AgentError(f"lxc-stop did not stop {name}.", (err or out)[-2000:], {"state": state})
    # A saved state belongs to the filesystem we are about to replace.
    _remove_tree(_state_dir(name))
    event("copy", f"rolling the rootfs of {name} back to {snap}", 20)
    _sync(os.path.join(sdir, "rootfs"), rootfs)
    # The snapshot's config (it may have come from another host) only through the allowlist.
    try:
        snap_lines = _read_lines(os.path.join(sdir, "config"))
    except OSError:
        snap_lines = _read_config(name)
    dropped = _apply_allowlist(_cdir(name), name, snap_lines, f"the config of snapshot {snap}")
    t_restore = time.monotonic()
    if stateful:
        event("restore", f"restoring the processes of {name} from {snap}", 60)
        _criu_restore(name, images, failure=f"Restoring {name} from snapshot {snap} failed", has_saved_state=False)
        stats = _criu_stats(images, "restore")
    else:
        event("restore", f"starting {name} (stateless snapshot: cold start)", 60)
        _lxc_start(name)
        stats = {}
    stats["restore_ms"] = _ms(t_restore)
    stats["total_ms"] = _ms(t0)
    event("restore", f"{name} restored from {snap} in {stats['total_ms']} ms", 100)
    out = {"name": name, "snapshot": snap, "state": _state(name), "stateful": stateful, "stats": stats}
    if dropped:
        out["config_dropped"] = dropped
    return out


def cmd_delete_snapshot(params):
    name = check_name(params.get("name"))
    snap = check_name(params.get("snapshot"), "snapshot")
    sdir = _snap_dir(name, snap)
    if not os.path.isdir(sdir):
        raise AgentError(f"{name} has no snapshot {snap} on this host.")
    event("delete", f"deleting snapshot {snap} of {name}", 50)
    _remove_tree(sdir)
    return {"name": name, "snapshot": snap, "deleted": True}


def cmd_snapshot_contents(params):
    name = check_name(params.get("name"))
    snap = check_name(params.get("snapshot"), "snapshot")
    sdir, meta = _load_snapshot(name, snap)
    images = os.path.join(sdir, "images")
    if not os.path.isdir(images):
        return {"name": name, "snapshot": snap, "stateful": False, "contents": None}
    event("decode", f"decoding the CRIU images of {snap}", 50)
    return {"name": name, "snapshot": snap, "stateful": True, "contents": _contents(images)}


# --- decoding CRIU images (pycriu) ------------------------------------------------------

FSTYPES = {
    0: "unsupported", 1: "proc", 2: "sysfs", 3: "devtmpfs", 4: "binfmt_misc", 5: "tmpfs", 6: "devpts",
    7: "simfs", 8: "pstore", 9: "securityfs", 10: "fusectl", 11: "debugfs", 12: "cgroup", 13: "aufs",
    14: "mqueue", 15: "fuse", 16: "auto", 17: "overlay", 18: "autofs", 19: "tracefs",
}  # fmt: skip
FAMILIES = {1: "unix", 2: "inet", 10: "inet6", 16: "netlink", 17: "packet"}
SOCK_TYPES = {1: "stream", 2: "dgram", 3: "raw", 5: "seqpacket"}
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}  # fmt: skip
PE_PARENT, PE_PRESENT = 1, 4


def _named(value, table):
    if isinstance(value, int):
        return table.get(value, str(value))
    return str(value).lower() if table is not TCP_STATES else str(value)


def _addr(value, family):
    """CRIU stores addresses as 32-bit words; pycriu's pretty mode gives strings."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(w, int) for w in value):
        raw = b"".join(w.to_bytes(4, "little") for w in value)
        try:
            fam = socket.AF_INET6 if family in (10, "INET6", "inet6") or len(raw) == 16 else socket.AF_INET
            return socket.inet_ntop(fam, raw[:16] if fam == socket.AF_INET6 else raw[:4])
        except (OSError, ValueError):
            return raw.hex()
    return None if value is None else str(value)


def _unix_name(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    value = str(value or "")
    while value.endswith("=00"):  # pycriu marks the trailing NUL so
        value = value[:-3]
    return value.rstrip("\x00") or None


class _Images:
    def __init__(self, directory, pycriu):
        self.dir = directory
        self.pycriu = pycriu
        self.errors = []

    def load(self, fname, pretty=False, required=True):
        path = os.path.join(self.dir, fname)
        if not os.path.exists(path):
            if required:
                self.errors.append(f"{fname}: missing")
            return None
        try:
            with open(path, "rb") as f:
                return self.pycriu.images.load(f, pretty=pretty)["entries"]
        except Exception as e:
            self.errors.append(f"{fname}: {type(e).__name__}: {e}"[:300])
            return None

    def read_memory(self, pid, pagemap, addr, length):
        """Bytes [addr, addr+length) of a process from its pages image, or None."""
        if not pagemap or "pages_id" not in pagemap[0]:
            return None
        offset = 0  # in pages, within pages-<pages_id>.img
        for e in pagemap[1:]:
            n = int(e.get("nr_pages", 0))
            flags = e.get("flags", PE_PRESENT)
            flags = flags if isinstance(flags, int) else PE_PRESENT
            in_file = bool(flags & PE_PRESENT) and not flags & PE_PARENT
            start = int(e.get("vaddr", 0))
            if in_file and start <= addr and addr + length <= start + n * PAGE_SIZE:
                try:
                    with open(os.path.join(self.dir, "pages-{}.img".format(pagemap[0]["pages_id"])), "rb") as f:
                        f.seek(offset * PAGE_SIZE + addr - start)
                        return f.read(length)
                except OSError:
                    return None
            if in_file:
                offset += n
        return None


def _describe_file(entry):
    """One files.img entry as {type, path|socket|...}."""
    ftype = str(entry.get("type", "?"))
    out = {"type": ftype}
    if ftype == "REG" and "reg" in entry:
        out["path"] = entry["reg"].get("name")
        if "size" in entry["reg"]:
            out["size"] = entry["reg"]["size"]
    elif ftype == "UNIXSK" and "usk" in entry:
        usk = entry["usk"]
        out["socket"] = {
            "family": "unix",
            "type": _named(usk.get("type"), SOCK_TYPES),
            "state": _named(usk.get("state"), TCP_STATES),
            "path": _unix_name(usk.get("name")),
            "peer": usk.get("peer") or None,
            "ino": usk.get("ino"),
        }
    elif ftype == "INETSK" and "isk" in entry:
        isk = entry["isk"]
        fam = isk.get("family")
        out["socket"] = {
            "family": _named(fam, FAMILIES),
            "type": _named(isk.get("type"), SOCK_TYPES),
            "proto": isk.get("proto"),
            "state": _named(isk.get("state"), TCP_STATES),
            "src": "{}:{}".format(_addr(isk.get("src_addr"), fam), isk.get("src_port")),
            "dst": "{}:{}".format(_addr(isk.get("dst_addr"), fam), isk.get("dst_port")),
            "ino": isk.get("ino"),
        }
    else:
        # pipes, eventfds, netlink/packet sockets, ...: name the kind, keep small fields
        for key, value in entry.items():
            if isinstance(value, dict) and key not in ("type", "id"):
                out[key] = {k: v for k, v in value.items() if isinstance(v, (int, str)) and k != "fown"}
    return out


def _contents(images_dir):
    """What a stateful snapshot holds, decoded from its CRIU images with the host's pycriu.
    Never raises: an image that does not decode becomes a string in `errors`."""
    contents = {"processes": [], "sockets": [], "mounts": [], "stats": {}, "images": [], "errors": []}
    try:
        contents["images"] = _image_files(images_dir)
        contents["images_bytes"] = sum(i["size"] for i in contents["images"])
    except OSError as e:
        contents["errors"].append(f"images: {e}")
        return contents
    try:
        import pycriu
    except Exception as e:
        contents["errors"].append(f"pycriu: {type(e).__name__}: {e}")
        return contents
    img = _Images(images_dir, pycriu)
    try:
        contents["stats"] = _criu_stats(images_dir, "dump")
        files = {}
        for fname in ("files.img", "reg-files.img", "unixsk.img", "inetsk.img"):
            for e in img.load(fname, pretty=True, required=(fname == "files.img")) or []:
                try:
                    if "type" in e:
                        files[e["id"]] = e
                    else:  # pre-3.x split images: one image per kind
                        kind = {"reg-files.img": ("REG", "reg"), "unixsk.img": ("UNIXSK", "usk")}.get(
                            fname, ("INETSK", "isk")
                        )
                        files[e["id"]] = {"type": kind[0], "id": e["id"], kind[1]: e}
                except Exception as ex:
                    img.errors.append(f"{fname}: {type(ex).__name__}: {ex}")
        seen_sockets = set()
        for f in files.values():
            d = _describe_file(f)
            if "socket" in d and d["socket"].get("ino") not in seen_sockets:
                seen_sockets.add(d["socket"].get("ino"))
                contents["sockets"].append(d["socket"])
        for p in img.load("pstree.img") or []:
            contents["processes"].append(_process(img, p, files))
        for path in sorted(glob.glob(os.path.join(images_dir, "mountpoints-*.img"))):
            for m in img.load(os.path.basename(path)) or []:
                fstype = m.get("fstype")
                contents["mounts"].append(
                    {
                        "mountpoint": m.get("mountpoint"),
                        "fstype": m.get("fsname") or FSTYPES.get(fstype, str(fstype)),
                        "source": m.get("source"),
                        "root": m.get("root"),
                        "options": m.get("options"),
                    }
                )
    except Exception as e:  # a shape we did not expect: report it, keep what we have
        img.errors.append(f"decode: {type(e).__name__}: {e}")
    contents["errors"] = img.errors
    return contents


def _process(img, p, files):
    pid = p.get("pid")
    proc = {
        "pid": pid,
        "ppid": p.get("ppid"),
        "pgid": p.get("pgid"),
        "sid": p.get("sid"),
        "threads": p.get("threads", []),
    }
    try:
        core = img.load(f"core-{pid}.img")
        if core:
            tc = core[0].get("tc") or {}
            proc["comm"] = tc.get("comm")
            proc["task_state"] = tc.get("task_state")
        mm = (img.load(f"mm-{pid}.img") or [None])[0]
        pagemap = img.load(f"pagemap-{pid}.img")
        if mm:
            proc["mapped_bytes"] = sum(int(v["end"]) - int(v["start"]) for v in mm.get("vmas", []))
            proc["vmas"] = len(mm.get("vmas", []))
            exe = files.get(mm.get("exe_file_id"))
            if exe and "reg" in exe:
                proc["exe"] = exe["reg"].get("name")
            start, end = int(mm.get("mm_arg_start", 0)), int(mm.get("mm_arg_end", 0))
            if pagemap and 0 < end - start <= 8192:
                raw = img.read_memory(pid, pagemap, start, end - start)
                if raw:
                    proc["cmdline"] = [a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0")]
        if pagemap:
            proc["dumped_bytes"] = sum(int(e.get("nr_pages", 0)) for e in pagemap[1:]) * PAGE_SIZE
        if not proc.get("cmdline") and proc.get("comm"):
            proc["cmdline"] = [proc["comm"]]
        proc["command"] = " ".join(proc.get("cmdline") or [])
        ids = (img.load(f"ids-{pid}.img", required=False) or [{}])[0]
        fds = img.load("fdinfo-{}.img".format(ids.get("files_id")), required=False) if ids.get("files_id") else None
        proc["files"] = []
        for fd in fds or []:
            d = _describe_file(files.get(fd.get("id"), {"type": str(fd.get("type"))}))
            d["fd"] = fd.get("fd")
            proc["files"].append(d)
        fs = (img.load(f"fs-{pid}.img", required=False) or [{}])[0]
        for key in ("cwd", "root"):
            f = files.get(fs.get(f"{key}_id"))
            if f and "reg" in f:
                proc[key] = f["reg"].get("name")
    except Exception as e:
        img.errors.append(f"process {pid}: {type(e).__name__}: {e}"[:300])
    return proc


# --- debug bundle -----------------------------------------------------------------------

BUNDLE_FILE_LIMIT = 8 << 20  # the tail of a bigger log is enough
SECRET_PREFIXES = ("/root/.ssh", "/etc/ssh", "/home")


def _secret(path):
    real = os.path.realpath(path)
    base = os.path.basename(real)
    return (
        any(real == p or real.startswith(p + "/") for p in SECRET_PREFIXES)
        or base.startswith(("id_rsa", "id_ed25519", "id_ecdsa", "id_dsa", "ssh_host_"))
        or base.endswith((".key", ".pem"))
    )


def _bundle_dirs(name, dirs):
    """Images/state dirs to collect logs from, as real paths below /var/lib/ctweb."""
    out = []
    if dirs is not None:
        if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
            raise AgentError("dirs must be a list of paths relative to /var/lib/ctweb.")
        for d in dirs:
            norm = os.path.normpath(d)
            if os.path.isabs(d) or norm.startswith("..") or "\x00" in d:
                raise AgentError(f"Bad bundle directory {d!r}: give a path relative to {CTWEB_PATH}.")
            real = os.path.realpath(os.path.join(CTWEB_PATH, norm))
            if not real.startswith(CTWEB_PATH + "/"):
                raise AgentError(f"Bad bundle directory {d!r}.")
            out.append(real)
        return out
    if name:
        out.append(_state_dir(name))
        out += sorted(glob.glob(os.path.join(SNAPSHOTS_PATH, name, "*")))
    return out


def cmd_bundle(params):
    """{op, name=null, dirs=null}: a tar.gz of what explains a failure, at
    /var/lib/ctweb/bundles/op-<op>.tar.gz (the dashboard fetches and deletes it)."""
    op = params.get("op")
    if not isinstance(op, int) or isinstance(op, bool) or op < 0:
        raise AgentError("op must be a non-negative integer.")
    name = params.get("name")
    if name is not None:
        check_name(name)
    dirs = _bundle_dirs(name, params.get("dirs"))
    os.makedirs(BUNDLES_PATH, exist_ok=True)
    path = os.path.join(BUNDLES_PATH, f"op-{op}.tar.gz")
    tmp = path + ".tmp"
    prefix = f"op-{op}"
    members = []
    event("bundle", "collecting logs and host facts", 20)

    def add_bytes(tar, arcname, data):
        info = tarfile.TarInfo(f"{prefix}/{arcname}")
        info.size = len(data)
        info.mtime = int(time.time())
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
        members.append(arcname)

    def add_file(tar, src, arcname):
        if _secret(src) or not os.path.isfile(src) or os.path.islink(src):
            return
        try:
            with open(src, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > BUNDLE_FILE_LIMIT:
                    f.seek(size - BUNDLE_FILE_LIMIT)
                add_bytes(tar, arcname, f.read(BUNDLE_FILE_LIMIT))
        except OSError as e:
            add_bytes(tar, arcname + ".error", f"{src}: {e}\n".encode())

    def add_cmd(tar, arcname, argv, keep_tail=None, timeout=60):
        rc, out, err = run(argv, timeout=timeout)
        text = out + (("\n--- stderr ---\n" + err) if err.strip() else "")
        if keep_tail:
            text = "\n".join(text.splitlines()[-keep_tail:]) + "\n"
        add_bytes(tar, arcname, f"$ {' '.join(argv)}\n(exit status {rc})\n{text}".encode())

    with tarfile.open(tmp, "w:gz") as tar:
        add_cmd(tar, "host/uname.txt", ["uname", "-a"])
        add_cmd(tar, "host/criu-check.txt", ["criu", "check"], timeout=90)
        add_cmd(tar, "host/criu-version.txt", ["criu", "--version"])
        add_cmd(tar, "host/lxc-version.txt", ["lxc-start", "--version"])
        add_cmd(tar, "host/dmesg-tail.txt", ["dmesg"], keep_tail=200)
        add_file(tar, "/proc/self/mountinfo", "host/mountinfo.txt")
        add_file(tar, "/etc/os-release", "host/os-release.txt")
        if name:
            cdir = _cdir(name)
            for fname in ("config", "lxc.log", "console.log", "lxc-checkpoint.log"):
                add_file(tar, os.path.join(cdir, fname), f"container/{fname}")
            if _exists(name):
                add_cmd(tar, "container/lxc-info.txt", ["lxc-info", "-n", name])
        for d in dirs:
            rel = os.path.relpath(d, CTWEB_PATH)
            for root, subdirs, fnames in os.walk(d):
                subdirs[:] = [s for s in subdirs if s != "rootfs"]  # never the container's files
                for fname in sorted(fnames):
                    if fname.endswith(".log") or fname.startswith("stats-") or fname in ("meta.json", "config"):
                        src = os.path.join(root, fname)
                        add_file(tar, src, os.path.join("ctweb", rel, os.path.relpath(src, d)))
    os.replace(tmp, path)
    size = os.path.getsize(path)
    event("bundle", f"bundle written ({size} bytes)", 100)
    return {"path": path, "size_bytes": size, "files": members}


# --- migration -------------------------------------------------------------------------
# The dashboard relays tars between two hosts' agents: `send` writes one to stdout,
# `receive` reads one from stdin (after its JSON parameter line). No host talks to another,
# unless an admin allowed direct transfer on their network: then `receive` listens and
# `send` connects to it (see "direct transfer" below), and stdin only tells them the
# dashboard is still there.

MIGRATIONS_PATH = os.path.join(CTWEB_PATH, "migrations")
SEND_KINDS = ("rootfs", "snapshots", "state", "cpuinfo", "delta", "images")
DELTA_MEMBER = ".ctweb-delta.json"


def _mig_dir(params):
    mid = params.get("migration")
    if not isinstance(mid, int) or mid <= 0:
        raise AgentError("Bad migration id.")
    return os.path.join(MIGRATIONS_PATH, str(mid))


def _mig_marker(name, params):
    return os.path.join(_cdir(name), f".ctweb-migration-{int(params['migration'])}")


def _manifest(root):
    """What the rootfs holds now: path -> [mode, size, mtime_ns, inode, link target]."""
    out = {}
    for base, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(base, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            rel = os.path.relpath(p, root)
            target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            out[rel] = [st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, target]
    return out


def cmd_migrate_prepare(params):
    name = _require(params.get("name"))
    mdir = _mig_dir(params)
    os.makedirs(mdir, exist_ok=True)
    rootfs_bytes = _du(_cdir(name))
    snaps = _snapshot_names(name)
    snap_bytes = _du(os.path.join(SNAPSHOTS_PATH, name)) if snaps else 0
    state_bytes = _du(_state_dir(name)) if _has_saved_state(name) else 0
    memory = _memory_bytes(name) if _state(name) == "RUNNING" else 0
    event("preflight", f"{name}: rootfs {rootfs_bytes >> 20} MiB, memory {memory >> 20} MiB, {len(snaps)} snapshot(s)")
    return {
        "state": _state(name),
        "rootfs_bytes": rootfs_bytes,
        "memory_bytes": memory,
        "snapshots": snaps,
        "has_saved_state": _has_saved_state(name),
        "need_bytes": rootfs_bytes + snap_bytes + state_bytes + memory,
    }


def cmd_migrate_check(params):
    """On the target, before anything moves: the name is free, the disk and bridge are there."""
    name = check_name(params.get("name"))
    if os.path.exists(_cdir(name)):
        raise AgentError(f"{name} exists on this host already.")
    need = params.get("need_bytes") or 0
    if not isinstance(need, int) or need < 0:
        raise AgentError("Bad need_bytes.")
    os.makedirs(LXC_PATH, exist_ok=True)
    free = shutil.disk_usage(LXC_PATH).free
    if free < int(need * 1.2) + DISK_MARGIN:
        raise AgentError(
            f"Not enough disk space: about {(int(need * 1.2) + DISK_MARGIN) >> 20} MiB needed, {free >> 20} MiB free."
        )
    bridge = params.get("bridge")
    if bridge and (
        not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", bridge) or not os.path.isdir(f"/sys/class/net/{bridge}/bridge")
    ):
        raise AgentError(f"This host has no bridge {bridge} for the container's network.")
    if shutil.which("criu") is None or shutil.which("lxc-checkpoint") is None:
        raise AgentError("CRIU or lxc-checkpoint is missing on this host.")
    os.makedirs(_mig_dir(params), exist_ok=True)
    return {"free_bytes": free}


def _send_sources(name, params, what):
    """(directory to archive, name inside the tar) pairs for one kind of send."""
    mdir = _mig_dir(params)
    if what == "rootfs":
        _write_json(os.path.join(mdir, "manifest.json"), _manifest(_rootfs(name)))
        return [(_cdir(name), name)]
    if what == "snapshots":
        return [(os.path.join(SNAPSHOTS_PATH, name), name)]
    if what == "state":
        return [(_state_dir(name), name)]
    if what == "cpuinfo":
        cpu = os.path.join(mdir, "cpu")
        os.makedirs(cpu, exist_ok=True)
        run(["criu", "cpuinfo", "dump", "-D", cpu], timeout=60, check=True)
        return [(cpu, "cpu")]
    if what == "images":
        return [(os.path.join(mdir, "images"), "images")]
    raise AgentError(f"Cannot send {what!r}.")


# Safe tree walking for `send`: every path is opened relative to its parent directory's
# descriptor with O_NOFOLLOW, so a container that swaps a directory for a symlink while
# we read its running rootfs can never make us read a file of the host.
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _tarinfo(arcname, st, linkname=""):
    info = tarfile.TarInfo(arcname)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.mtime = st.st_mtime
    if stat.S_ISREG(st.st_mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, linkname
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
    else:
        return None  # sockets and the like do not travel
    return info


def _add_entry(tar, dir_fd, name, arcname, links):
    """Add one directory entry (not recursing). Returns the entry's lstat or None."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None  # deleted while we read: the delta will say so
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        first = links.get((st.st_dev, st.st_ino))
        if first:
            info = _tarinfo(arcname, st)
            info.type, info.linkname, info.size = tarfile.LNKTYPE, first, 0
            tar.addfile(info)
            return st
        links[(st.st_dev, st.st_ino)] = arcname
    linkname = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else ""
    info = _tarinfo(arcname, st, linkname)
    if info is None:
        return st
    if info.type == tarfile.REGTYPE:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=dir_fd)
        except (FileNotFoundError, OSError):
            return None
        with os.fdopen(fd, "rb") as f:
            fst = os.fstat(f.fileno())
            if not stat.S_ISREG(fst.st_mode):
                return None
            info.size = fst.st_size
            tar.addfile(info, _Exactly(f, fst.st_size))
        return st
    tar.addfile(info)
    return st


class _Exactly:
    """A reader that yields exactly n bytes: a file that grows or shrinks while we read it
    still matches the size its tar header promised (zero-padded if it shrank)."""

    def __init__(self, f, n):
        self.f, self.left = f, n

    def read(self, size=-1):
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.f.read(size)
        if len(data) < size:
            data += b"\0" * (size - len(data))
        self.left -= len(data)
        return data


def _tar_tree(tar, path, arcname):
    """Add a directory tree to `tar` without ever following a symlink."""
    links = {}
    top = os.open(path, _NOFOLLOW_DIR)
    try:
        tar.addfile(_tarinfo(arcname, os.fstat(top)))
        stack = [(top, arcname)]
        while stack:
            dir_fd, arc = stack.pop()
            try:
                names = sorted(os.listdir(dir_fd))
                for n in names:
                    st = _add_entry(tar, dir_fd, n, f"{arc}/{n}", links)
                    if st is not None and stat.S_ISDIR(st.st_mode):
                        try:
                            stack.append((os.open(n, _NOFOLLOW_DIR, dir_fd=dir_fd), f"{arc}/{n}"))
                        except OSError:
                            pass  # became a symlink or vanished: not followed
            finally:
                if dir_fd != top:
                    os.close(dir_fd)
    finally:
        os.close(top)


def _add_path(tar, root, rel, arcname):
    """Add one path below `root` (for the delta), walking its parents without following symlinks."""
    parts = rel.split("/")
    fd = os.open(root, _NOFOLLOW_DIR)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
        _add_entry(tar, fd, parts[-1], arcname, {})
    except OSError:
        pass  # a parent vanished or is a symlink now: nothing of it is sent
    finally:
        os.close(fd)


def cmd_send(params):
    name = _require(params.get("name"))
    what = params.get("what")
    if what not in SEND_KINDS:
        raise AgentError(f"Cannot send {what!r}.")
    direct = params.get("direct") is not None
    t0 = time.monotonic()
    out = _direct_connect(params) if direct else sys.stdout.buffer
    try:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            if what == "delta":
                _add_delta(tar, name, params)
            else:
                for path, arcname in _send_sources(name, params, what):
                    _tar_tree(tar, path, arcname)
        out.flush()
        if not direct:
            return None  # raw tar only: no JSON on stdout
        out.finish()
    finally:
        if direct:
            out.conn.close()
    return {"bytes": out.bytes, "sha256": out.hash.hexdigest(), "ms": _ms(t0)}


def _add_delta(tar, name, params):
    """What changed in the rootfs since the first copy, and what was deleted (a small rsync)."""
    before = _read_json(os.path.join(_mig_dir(params), "manifest.json"))
    if before is None:
        raise AgentError("No first copy was made for this migration.")
    root = _rootfs(name)
    now = _manifest(root)
    rel_root = os.path.relpath(root, _cdir(name))
    changed = sorted(p for p, v in now.items() if before.get(p) != v)
    deleted = sorted(p for p in before if p not in now)
    for rel in changed:
        _add_path(tar, root, rel, f"{name}/{rel_root}/{rel}")
    _add_path(tar, _cdir(name), "config", f"{name}/config")
    data = json.dumps({"deleted": deleted, "changed": len(changed)}).encode()
    info = tarfile.TarInfo(DELTA_MEMBER)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# --- receive: beneath the receiving directory, never through a symlink ----------------------
# The tar comes from another host, and a compromised host controls every byte of it. It is
# unpacked into a fresh private (0700) staging directory beside its destination (same
# filesystem): every member is created relative to its parent directory's descriptor, each
# parent opened with O_NOFOLLOW, so nothing the archive plants (nor anything already on the
# disk) is ever followed. Only once the whole stream arrived (and, for a direct transfer,
# passed its authentication) is the staged tree renamed into place (a delta's files are
# renamed one by one into the existing container directory, again walking by descriptors).
# A refused or broken stream leaves only its staging directory, which is removed.

RECV_STAGE_PREFIX = ".ctweb-recv-"
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID
# The configured roots (LXC_PATH, CTWEB_PATH's directories) are the admin's: they may be
# symlinks (/var/lib/lxc -> /srv/lxc). Everything below them is never followed.
_ROOT_DIR = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_COPY_CHUNK = 1 << 20


def _split_member(name, what="member"):
    """A member name as path components; refused if absolute, empty or leading upwards."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\0" in name:
        raise AgentError(f"Refusing a tar {what} outside its directory: {name!r}")
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise AgentError(f"Refusing a tar {what} outside its directory: {name!r}")
    return parts


def _open_beneath(base_fd, parts, create=False):
    """The directory base/parts..., each component opened with O_NOFOLLOW (a symlink on the
    way fails with ELOOP/ENOTDIR); missing ones made (0700) when `create`."""
    fd = os.dup(base_fd)
    try:
        for part in parts:
            if create:
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
            nfd = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _lstat_at(dir_fd, name):
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_at(dir_fd, name):
    """Remove one entry (a directory with all it holds), never following a symlink."""
    st = _lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # descriptor-based: symlinks inside are removed, not followed
    else:
        os.unlink(name, dir_fd=dir_fd)


def _in_rootfs(what, parts):
    """Is this member inside a rootfs (the only place for device nodes, setuid files, symlinks)?"""
    if what in ("rootfs", "delta"):
        return len(parts) > 2 and parts[1] == "rootfs"
    if what == "snapshots":
        return len(parts) > 3 and parts[2] == "rootfs"
    return False


def _check_member(m, what, top_name):
    """Refuse what a member may not be, naming it. Returns its path components."""
    parts = _split_member(m.name)
    if parts[0] != top_name:
        raise AgentError(f"Refusing a tar member outside {top_name}/: {m.name!r}")
    kind = (
        "dir"
        if m.isdir()
        else "file"
        if m.isreg()
        else "symlink"
        if m.issym()
        else "hardlink"
        if m.islnk()
        else "device"
        if m.ischr() or m.isblk()
        else "fifo"
        if m.isfifo()
        else None
    )
    if kind is None:
        raise AgentError(f"Refusing a tar member of an unknown kind: {m.name!r}")
    if len(parts) == 1 and kind != "dir":
        raise AgentError(f"Refusing {m.name!r}: the top of a received tree must be a plain directory.")
    inside = _in_rootfs(what, parts)
    if kind in ("symlink", "device", "fifo") and not inside:
        raise AgentError(f"Refusing a {kind} outside a rootfs: {m.name!r}")
    if m.mode & _SPECIAL_BITS and not inside:
        raise AgentError(f"Refusing a setuid/setgid member outside a rootfs: {m.name!r}")
    if what in ("rootfs", "delta") and len(parts) == 2:
        if parts[1] == "config.tmp":
            raise AgentError(f"Refusing {m.name!r}: the agent writes that name itself.")
        if parts[1] == "config" and kind not in ("file", "hardlink"):
            raise AgentError(f"Refusing {m.name!r}: a container's config must be a plain file.")
        if parts[1] == "rootfs" and kind != "dir":
            raise AgentError(f"Refusing {m.name!r}: a container's rootfs must be a plain directory.")
    if what == "snapshots" and len(parts) == 3 and parts[2] in ("config", "rootfs", "meta.json", "images"):
        if (parts[2] in ("rootfs", "images")) != (kind == "dir"):
            raise AgentError(f"Refusing {m.name!r}: not what a snapshot keeps under that name.")
    return parts, kind


class _Stager:
    """Unpacks members into a private staging directory, by descriptors only."""

    def __init__(self, stage_fd, what, top_name):
        self.fd, self.what, self.top_name = stage_fd, what, top_name
        self.files = {}  # member name -> True for regular files staged (hard-link sources)
        self.dirs = {}  # path components -> TarInfo of directory members (attributes set last)
        self.as_root = os.geteuid() == 0
        self.count = 0
        self._parent = None  # (components, descriptor) of the last parent: members come grouped

    def _open_parent(self, parts):
        key = tuple(parts)
        if self._parent is not None and self._parent[0] == key:
            return self._parent[1]
        self.close()
        fd = _open_beneath(self.fd, parts, create=True)
        self._parent = (key, fd)
        return fd

    def close(self):
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def _owner(self, m, leaf, dir_fd, fd=None):
        if not self.as_root:
            return
        if fd is not None:
            os.fchown(fd, m.uid, m.gid)
        else:
            os.chown(leaf, m.uid, m.gid, dir_fd=dir_fd, follow_symlinks=False)

    def add(self, m, tar):
        parts, kind = _check_member(m, self.what, self.top_name)
        leaf = parts[-1]
        parent = self._open_parent(parts[:-1])  # owned by the cache, closed by close()
        old = _lstat_at(parent, leaf)
        if old is not None and not (kind == "dir" and stat.S_ISDIR(old.st_mode)):
            _remove_at(parent, leaf)  # a child of the cached parent: the cache stays right
            for n in [n for n in self.files if n == m.name or n.startswith(m.name + "/")]:
                del self.files[n]
            for d in [d for d in self.dirs if d[: len(parts)] == tuple(parts)]:
                del self.dirs[d]
        self.files.pop(m.name, None)
        mode = stat.S_IMODE(m.mode)
        if kind == "dir":
            if old is None or not stat.S_ISDIR(old.st_mode):
                os.mkdir(leaf, 0o700, dir_fd=parent)
            self.dirs[tuple(parts)] = m
        elif kind == "file":
            fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC, 0o600, dir_fd=parent)
            with os.fdopen(fd, "wb", buffering=0) as out:
                src = tar.extractfile(m)
                while True:
                    chunk = src.read(_COPY_CHUNK)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        view = view[out.write(view) :]
                self._owner(m, leaf, parent, fd)
                os.fchmod(fd, mode)  # after chown, which clears setuid bits
                os.utime(fd, (m.mtime, m.mtime))
            self.files[m.name] = True
        elif kind == "symlink":
            os.symlink(m.linkname, leaf, dir_fd=parent)
            self._owner(m, leaf, parent)
            os.utime(leaf, (m.mtime, m.mtime), dir_fd=parent, follow_symlinks=False)
        elif kind == "hardlink":
            lparts = _split_member(m.linkname, "hard link")
            target = "/".join(lparts)
            if not self.files.get(target):
                raise AgentError(f"Refusing a hard link to what this tar did not bring: {m.name!r} -> {m.linkname!r}")
            if _in_rootfs(self.what, lparts) and not _in_rootfs(self.what, parts):
                raise AgentError(f"Refusing a hard link across directories: {m.name!r} -> {m.linkname!r}")
            src_fd = _open_beneath(self.fd, lparts[:-1])
            try:
                os.link(lparts[-1], leaf, src_dir_fd=src_fd, dst_dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(src_fd)
            self.files[m.name] = True
        else:  # device node or fifo, inside a rootfs only (checked)
            fmt = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            os.mknod(leaf, fmt | 0o600, os.makedev(m.devmajor, m.devminor) if fmt != stat.S_IFIFO else 0, dir_fd=parent)
            self._owner(m, leaf, parent)
            os.chmod(leaf, mode, dir_fd=parent)  # just made in our private directory: not a symlink
            os.utime(leaf, (m.mtime, m.mtime), dir_fd=parent, follow_symlinks=False)
        self.count += 1

    def apply_dir(self, parts, fd):
        m = self.dirs.get(tuple(parts))
        if m is None:
            return
        if self.as_root:
            os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, stat.S_IMODE(m.mode))
        os.utime(fd, (m.mtime, m.mtime))

    def finish_dirs(self):
        """Directory attributes last (deepest first), as tar does: writing into them changed mtimes."""
        for parts in sorted(self.dirs, key=len, reverse=True):
            fd = _open_beneath(self.fd, parts)
            try:
                self.apply_dir(parts, fd)
            finally:
                os.close(fd)


def _stage(stage_fd, what, top_name, stream):
    """Unpack the tar read from `stream` into the staging directory; (stager, the delta's list)."""
    stager = _Stager(stage_fd, what, top_name)
    try:
        _stage_members(stager, stream)
    finally:
        stager.close()
    if what != "delta":
        stager.finish_dirs()
    return stager, stager.delta


def _stage_members(stager, stream):
    what = stager.what
    stager.delta = None
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for m in tar:
            if m.name == DELTA_MEMBER and what == "delta" and m.isreg():
                if m.size > (64 << 20):
                    raise AgentError("The delta's list of deletions is too big.")
                delta = json.load(tar.extractfile(m))
                if not isinstance(delta, dict):
                    raise AgentError("The delta's list of deletions is damaged.")
                stager.delta = delta
                continue
            try:
                stager.add(m, tar)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise
                raise AgentError(
                    f"Refusing a tar member that would lead outside its directory or cannot be created beneath it: {m.name!r} ({e.strerror or e})"
                ) from None


def _merge(stager, src_fd, dst_fd, parts):
    """Move a staged delta's entries into the container directory, descriptor by descriptor:
    a directory over a real directory is merged, anything else replaces what was there."""
    for n in sorted(os.listdir(src_fd)):
        sst = _lstat_at(src_fd, n)
        dst = _lstat_at(dst_fd, n)
        if stat.S_ISDIR(sst.st_mode) and dst is not None and stat.S_ISDIR(dst.st_mode):
            s = os.open(n, _NOFOLLOW_DIR, dir_fd=src_fd)
            try:
                d = os.open(n, _NOFOLLOW_DIR, dir_fd=dst_fd)
                try:
                    _merge(stager, s, d, parts + [n])
                    stager.apply_dir(parts + [n], d)
                finally:
                    os.close(d)
            finally:
                os.close(s)
            continue
        if dst is not None:
            _remove_at(dst_fd, n)
        if stat.S_ISDIR(sst.st_mode):
            s = os.open(n, _NOFOLLOW_DIR, dir_fd=src_fd)
            try:
                _finish_subtree(stager, s, parts + [n])
            finally:
                os.close(s)
        os.rename(n, n, src_dir_fd=src_fd, dst_dir_fd=dst_fd)


def _finish_subtree(stager, fd, parts):
    for n in os.listdir(fd):
        if stat.S_ISDIR(os.stat(n, dir_fd=fd, follow_symlinks=False).st_mode):
            s = os.open(n, _NOFOLLOW_DIR, dir_fd=fd)
            try:
                _finish_subtree(stager, s, parts + [n])
            finally:
                os.close(s)
    stager.apply_dir(parts, fd)


def _delete_beneath(rootfs_fd, deleted):
    """A delta's deletions: each resolved by descriptors below the rootfs, never through a symlink."""
    n = 0
    for rel in deleted if isinstance(deleted, list) else []:
        try:
            parts = _split_member(rel)
        except AgentError:
            continue  # never outside the rootfs
        try:
            parent = _open_beneath(rootfs_fd, parts[:-1])
        except OSError:
            continue  # a parent is gone or is a symlink: nothing to delete through it
        try:
            _remove_at(parent, parts[-1])
            n += 1
        except OSError:
            pass
        finally:
            os.close(parent)
    return n


def _dest_fd(what, name, params):
    """The directory the received tree goes into, opened without following a symlink."""
    if what in ("cpuinfo", "images"):
        os.makedirs(MIGRATIONS_PATH, exist_ok=True)
        base = os.open(MIGRATIONS_PATH, _ROOT_DIR)
        try:
            return _open_beneath(base, [str(int(params["migration"]))], create=True)
        finally:
            os.close(base)
    path = {"rootfs": LXC_PATH, "delta": LXC_PATH, "snapshots": SNAPSHOTS_PATH, "state": STATE_PATH}[what]
    os.makedirs(path, exist_ok=True)
    return os.open(path, _ROOT_DIR)


def _place(stager, stage_fd, dest_fd, what, name, top_name, delta):
    """Put the verified staged tree in place; returns how many deletions the delta made."""
    if _lstat_at(stage_fd, top_name) is None:
        if what in ("rootfs", "delta") and delta is None and stager.count == 0:
            raise AgentError(f"The {what} arrived empty.")
        top = None
    else:
        top = top_name
    if what == "rootfs":
        cfg, rootfs = _lstat_at(stage_fd, f"{top_name}/config"), _lstat_at(stage_fd, f"{top_name}/rootfs")
        if cfg is None or not stat.S_ISREG(cfg.st_mode) or rootfs is None or not stat.S_ISDIR(rootfs.st_mode):
            raise AgentError(f"The rootfs arrived without {name}/config or {name}/rootfs: nothing was put in place.")
    if what != "delta":
        if top is None:
            return 0
        old = _lstat_at(dest_fd, top)
        if old is not None:
            if what == "rootfs":
                raise AgentError(f"{name} exists on this host already.")
            _remove_at(dest_fd, top)  # a stale copy (or anything planted there) is replaced, not merged into
        os.rename(top, top, src_dir_fd=stage_fd, dst_dir_fd=dest_fd)
        return 0
    try:
        cdir = _open_beneath(dest_fd, [name])
    except OSError:
        raise AgentError(
            f"{name}'s directory is missing or not a plain directory: the delta has nowhere to go."
        ) from None
    try:
        # Checked before anything moves: a refused delta changes nothing.
        rootfs = _lstat_at(cdir, "rootfs")
        if rootfs is None or not stat.S_ISDIR(rootfs.st_mode):
            raise AgentError(f"{name}'s rootfs is not a plain directory: the delta is refused.")
        cfg = _lstat_at(cdir, "config")
        staged_cfg = _lstat_at(stage_fd, f"{top_name}/config") if top is not None else None
        if not (staged_cfg and stat.S_ISREG(staged_cfg.st_mode)) and not (cfg and stat.S_ISREG(cfg.st_mode)):
            raise AgentError(f"{name}'s config is not a plain file and the delta brings none: refused.")
        if top is not None:
            src = os.open(top, _NOFOLLOW_DIR, dir_fd=stage_fd)
            try:
                _merge(stager, src, cdir, [top])
            finally:
                os.close(src)
        deleted = 0
        if delta:
            try:
                rootfs = os.open("rootfs", _NOFOLLOW_DIR, dir_fd=cdir)
            except OSError:
                raise AgentError(f"{name}'s rootfs is not a plain directory: no deletions are made.") from None
            try:
                deleted = _delete_beneath(rootfs, delta.get("deleted") or [])
            finally:
                os.close(rootfs)
        return deleted
    finally:
        os.close(cdir)


def _remove_stages(params):
    """Staging directories a killed receive of this migration left behind; True if any."""
    prefix = f"{RECV_STAGE_PREFIX}{int(params['migration'])}-"
    found = False
    for base in (LXC_PATH, SNAPSHOTS_PATH, STATE_PATH):
        try:
            fd = os.open(base, _ROOT_DIR)
        except OSError:
            continue
        try:
            for n in os.listdir(fd):
                if n.startswith(prefix):
                    _remove_at(fd, n)
                    found = True
        finally:
            os.close(fd)
    return found


def _clear_config_names(name):
    """No symlink (nor anything else) may sit at config.tmp, and config must be a plain file,
    before the agent rewrites the config there."""
    base = os.open(LXC_PATH, _ROOT_DIR)
    try:
        cdir = _open_beneath(base, [name])
    finally:
        os.close(base)
    try:
        _remove_at(cdir, "config.tmp")
        st = _lstat_at(cdir, "config")
        if st is not None and not stat.S_ISREG(st.st_mode):
            _remove_at(cdir, "config")
            raise AgentError(f"{name}'s config was not a plain file: removed.")
    finally:
        os.close(cdir)


def _write_beneath(name, fname, text):
    """Write LXC_PATH/<name>/<fname> without following a symlink anywhere."""
    base = os.open(LXC_PATH, _ROOT_DIR)
    try:
        cdir = _open_beneath(base, [name])
    finally:
        os.close(base)
    try:
        fd = os.open(fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | _O_CLOEXEC, 0o600, dir_fd=cdir)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    finally:
        os.close(cdir)


class _Stalling:
    """Standard input that gives up when nothing arrives for `stall_s` seconds: a sender
    whose link died must not keep this host's copy (and the container's lock) forever."""

    def __init__(self, f, stall_s):
        self.fd, self.stall_s = f.fileno(), stall_s

    def read(self, size=-1):
        size = 1 << 20 if size is None or size < 0 else size
        ready, _, _ = select.select([self.fd], [], [], self.stall_s)
        if not ready:
            raise AgentError(f"Nothing arrived for {self.stall_s} s: the transfer was cut off.")
        return os.read(self.fd, size)

    def drain(self):
        """After the tar's end: read on to the end of the stream (the archive's zero padding).
        Leaving before it would close our channel while the dashboard still relays those last
        bytes, and it would take that for a receiver that stopped taking data."""
        extra = 0
        while True:
            data = self.read(1 << 16)
            if not data:
                return
            extra += len(data)
            if extra > (16 << 20):
                raise AgentError("The sender went on sending after the end of the tar.")

    def verify(self):
        """Relayed over the dashboard's own SSH channels: what came is what the source sent."""


def cmd_receive(params):
    name = check_name(params.get("name"))
    what = params.get("what")
    mdir = _mig_dir(params)
    if what not in ("rootfs", "delta", "snapshots", "state", "cpuinfo", "images"):
        raise AgentError(f"Cannot receive {what!r}.")
    if what == "rootfs" and os.path.lexists(_cdir(name)):
        raise AgentError(f"{name} exists on this host already.")
    stall = params.get("stall_s", 120)
    if not isinstance(stall, (int, float)) or not 1 <= stall <= 3600:
        raise AgentError("Bad stall_s.")
    direct = _direct_params(params, ("listen", "peer")) if params.get("direct") is not None else None
    dest_fd = _dest_fd(what, name, params)
    try:
        if what == "rootfs":
            # Said before the first byte lands, so an interrupted copy is still ours to remove.
            os.makedirs(mdir, exist_ok=True)
            with open(os.path.join(mdir, "receiving"), "w") as f:
                f.write(name + "\n")
        t0 = time.monotonic()
        top_name = {"cpuinfo": "cpu", "images": "images"}.get(what, name)
        stage = f"{RECV_STAGE_PREFIX}{int(params['migration'])}-{what}-{os.getpid()}-{os.urandom(4).hex()}"
        os.mkdir(stage, 0o700, dir_fd=dest_fd)
        stage_fd = os.open(stage, _NOFOLLOW_DIR, dir_fd=dest_fd)
        stream = None
        try:
            try:
                if direct:
                    conn = _direct_accept(direct, stall)
                    try:
                        stream = _DirectIn(conn, stall, direct["token"])
                        stager, delta = _stage(stage_fd, what, top_name, stream)
                        stream.drain()
                        stream.verify()  # nothing is put in place before this
                    finally:
                        conn.close()
                else:
                    relayed = _Stalling(sys.stdin.buffer, stall)
                    stager, delta = _stage(stage_fd, what, top_name, relayed)
                    relayed.drain()
                    relayed.verify()
                deleted = _place(stager, stage_fd, dest_fd, what, name, top_name, delta)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise AgentError(f"This host's disk is full: no space left for the {what}.") from None
                raise
            except tarfile.TarError as e:
                raise AgentError(f"The {what} arrived cut short or damaged ({e}).") from None
        finally:
            os.close(stage_fd)
            _remove_at(dest_fd, stage)
    finally:
        os.close(dest_fd)
    dropped = None
    if what in ("rootfs", "delta"):
        _clear_config_names(name)
        dropped = _sanitize_received_config(name)
    elif what == "snapshots":
        dropped = _sanitize_received_snapshots(name)
    if what == "rootfs":
        _write_beneath(name, f".ctweb-migration-{int(params['migration'])}", "received by migration\n")
    out = {"files": stager.count, "ms": _ms(t0), "deleted": deleted}
    if dropped:
        out["config_dropped"] = dropped
    if stream is not None:
        out["bytes"], out["sha256"] = stream.bytes, stream.hash.hexdigest()
    return out


# --- direct transfer (only on networks an admin allowed) ----------------------------------
# The dashboard hands both agents the same one-time token over SSH. `receive` with
# direct={"listen": A, "peer": B, "token": T} listens on A (this host's own address) on an
# ephemeral port, says which in an event ("listening"), takes one connection from B that
# starts with the hello derived from the token, and stages the tar that follows with every
# check of a relayed one. `send` with direct={"bind": B, "address": A, "port": P, "token": T}
# connects from B to A:P, sends the hello, the tar, then a trailer: HMAC-SHA256 of every byte
# after the hello, keyed with another key derived from the token. The receiver puts nothing
# in place before that trailer is verified. The token itself never crosses the network (only
# HMAC(token, "hello") does, which gives nothing of the MAC key), so someone on the path can
# neither alter, truncate nor replace the stream unnoticed. The bytes are NOT encrypted. Both
# give up when the other side stalls, and stop at once when their standard input ends: the
# dashboard went away, was cancelled or gave up (it never writes more than the parameters line).

TOKEN_RE = re.compile(r"^[0-9a-f]{64}$")
DIRECT_CHUNK = 1 << 20
DIRECT_MAC_BYTES = 32


def _direct_keys(token):
    """(the hello line sent in the clear, the stream's MAC key), both derived from the token."""
    key = bytes.fromhex(token)
    hello = hmac.new(key, b"ctweb-direct-hello", hashlib.sha256).hexdigest()
    return (hello + "\n").encode(), hmac.new(key, b"ctweb-direct-mac", hashlib.sha256).digest()


def _direct_params(params, addresses):
    d = params.get("direct")
    if not isinstance(d, dict):
        raise AgentError("Bad direct-transfer parameters.")
    token = d.get("token")
    if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
        raise AgentError("Bad direct-transfer token.")
    out = {"token": token}
    for key in addresses:
        value = d.get(key)
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            out[key] = ipaddress.ip_address(value)
        except ValueError:
            raise AgentError(f"Bad direct-transfer address ({key}).") from None
    if "port" in d or "address" in addresses:
        port = d.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise AgentError("Bad direct-transfer port.")
        out["port"] = port
    return out


def _stdin_fd():
    return sys.stdin.buffer.fileno()


def _check_dashboard(fd):
    """Called when standard input is readable: its end means the dashboard let go."""
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:
        return
    if not data:
        raise AgentError("The dashboard ended the transfer (it was cancelled, failed elsewhere or lost its link).")


def _family(address):
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def _direct_accept(d, stall):
    """Listen on our address; return the one connection from the peer that brings the token."""
    srv = socket.socket(_family(d["listen"]), socket.SOCK_STREAM)
    try:
        try:
            srv.bind((str(d["listen"]), 0))
        except OSError as e:
            raise AgentError(
                f"Cannot listen on {d['listen']} ({e.strerror or e}): for direct transfer, the address the "
                "dashboard knows this host by must be one of the host's own."
            ) from None
        srv.listen(4)
        port = srv.getsockname()[1]
        event("transfer", f"listening on {d['listen']}:{port} for {d['peer']}", listening=port)
        fd = _stdin_fd()
        deadline = time.monotonic() + stall
        expected = _direct_keys(d["token"])[0]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"{d['peer']} did not connect within {stall} s.")
            ready, _, _ = select.select([srv, fd], [], [], left)
            if fd in ready:
                _check_dashboard(fd)
            if srv not in ready:
                continue
            conn, addr = srv.accept()
            if ipaddress.ip_address(addr[0]) != d["peer"]:
                conn.close()  # only the source host may feed us; anyone else is ignored
                event("transfer", f"ignored a connection from {addr[0]} (not {d['peer']})")
                continue
            got = b""
            conn.settimeout(min(stall, 30))
            try:
                while len(got) < len(expected):
                    chunk = conn.recv(len(expected) - len(got))
                    if not chunk:
                        break
                    got += chunk
            except OSError:
                pass
            if not hmac.compare_digest(got, expected):
                conn.close()
                raise AgentError(f"A connection from {d['peer']} did not bring this transfer's token (hello): refused.")
            conn.settimeout(None)
            return conn
    finally:
        srv.close()


class _DirectIn:
    """The tar from the source host's socket: gives up on a stall, stops when the dashboard
    lets go, and reports the bytes received (the dashboard shows them as progress). The last
    DIRECT_MAC_BYTES of the stream are the sender's MAC of everything before them: held
    back from the tar reader and checked by verify()."""

    def __init__(self, conn, stall_s, token):
        self.conn, self.stall_s, self.fd = conn, stall_s, _stdin_fd()
        self.bytes, self._said = 0, 0.0
        self.mac = hmac.new(_direct_keys(token)[1], digestmod=hashlib.sha256)
        # Reported as "sha256" and compared by the dashboard with the sender's, over SSH: the
        # HMAC-SHA256 of the stream (one pass over the bytes does both jobs).
        self.hash = self.mac
        self.pending = bytearray()  # received, MACed, not yet handed on
        self.tail = b""  # the last bytes received: the trailer once the sender has closed
        self.eof = False

    def _wait(self):
        while True:
            ready, _, _ = select.select([self.conn, self.fd], [], [], self.stall_s)
            if not ready:
                raise AgentError(f"Nothing arrived for {self.stall_s} s: the transfer was cut off.")
            if self.fd in ready:
                _check_dashboard(self.fd)
            if self.conn in ready:
                return

    def _recv(self, size):
        self._wait()
        try:
            data = self.conn.recv(size)
        except OSError as e:
            raise AgentError(f"The sending host's connection broke ({e.strerror or e}).") from None
        if not data:
            self.eof = True
            return
        self.bytes += len(data)
        data = self.tail + data
        cut = len(data) - DIRECT_MAC_BYTES
        if cut > 0:
            self.mac.update(data[:cut])
            self.pending += data[:cut]
            self.tail = data[cut:]
        else:
            self.tail = data
        now = time.monotonic()
        if now - self._said >= 0.25:
            self._said = now
            event("transfer", f"{self.bytes / 1048576:.1f} MiB received", bytes=self.bytes)

    def read(self, size=-1):
        size = DIRECT_CHUNK if size is None or size < 0 else size
        while not self.eof and not self.pending:
            self._recv(DIRECT_CHUNK)  # big reads: the tar reader asks for 10 KiB at a time
        data = bytes(self.pending[:size])
        del self.pending[:size]
        return data

    def drain(self):
        """After the tar's end: read up to the sender's end of stream, so it knows we have it all."""
        extra = 0
        while True:
            data = self.read(1 << 16)
            if not data:
                break
            extra += len(data)
            if extra > (16 << 20):
                raise AgentError("The sending host went on sending after the end of the tar.")
        event("transfer", f"{self.bytes / 1048576:.1f} MiB received", bytes=self.bytes)

    def verify(self):
        if self.pending or len(self.tail) != DIRECT_MAC_BYTES or not hmac.compare_digest(self.tail, self.mac.digest()):
            raise AgentError(
                "The direct stream failed its authentication (altered, cut short or not sent by the source "
                "host's agent): nothing of it was put in place."
            )


class _DirectOut:
    """The tar to the target host's socket, in 1 MiB writes; stops when the dashboard lets go."""

    def __init__(self, conn, stall_s, mac_key):
        self.conn, self.stall_s, self.fd = conn, stall_s, _stdin_fd()
        self.buf = bytearray()
        self.bytes = 0
        self.mac = hmac.new(mac_key, digestmod=hashlib.sha256)
        self.hash = self.mac  # the "sha256" the dashboard compares: the stream's HMAC-SHA256
        conn.settimeout(stall_s)  # for each 1 MiB write

    def write(self, data):
        self.buf += data
        if len(self.buf) >= DIRECT_CHUNK:
            self.flush()
        return len(data)

    def flush(self, trailer=False):
        ready, _, _ = select.select([self.fd], [], [], 0)
        if ready:
            _check_dashboard(self.fd)
        if not self.buf:
            return
        if not trailer:
            self.mac.update(self.buf)
        try:
            self.conn.sendall(self.buf)
        except TimeoutError:
            raise AgentError(f"The receiving host took nothing for {self.stall_s} s.") from None
        except OSError as e:
            raise AgentError(f"The receiving host closed the connection ({e.strerror or e}).") from None
        self.bytes += len(self.buf)
        self.buf.clear()

    def finish(self):
        """All sent: end our side and wait for the receiver to read it all and close its own."""
        self.flush()
        self.buf += self.mac.digest()
        self.flush(trailer=True)
        self.conn.shutdown(socket.SHUT_WR)
        while True:
            ready, _, _ = select.select([self.conn, self.fd], [], [], self.stall_s)
            if not ready:
                raise AgentError(f"The receiving host did not finish reading within {self.stall_s} s.")
            if self.fd in ready:
                _check_dashboard(self.fd)
            if self.conn in ready:
                try:
                    if not self.conn.recv(4096):
                        return
                except OSError as e:
                    raise AgentError(f"The receiving host broke the connection ({e.strerror or e}).") from None


def _direct_connect(params):
    d = _direct_params(params, ("bind", "address"))
    stall = params.get("stall_s", 120)
    if not isinstance(stall, (int, float)) or not 1 <= stall <= 3600:
        raise AgentError("Bad stall_s.")
    conn = socket.socket(_family(d["address"]), socket.SOCK_STREAM)
    try:
        try:
            conn.bind((str(d["bind"]), 0))  # from our own address: the receiver checks it
        except OSError as e:
            raise AgentError(
                f"Cannot send from {d['bind']} ({e.strerror or e}): for direct transfer, the address the "
                "dashboard knows this host by must be one of the host's own."
            ) from None
        conn.settimeout(30)
        try:
            conn.connect((str(d["address"]), d["port"]))
            hello, mac_key = _direct_keys(d["token"])
            conn.sendall(hello)
        except OSError as e:
            raise AgentError(f"Cannot connect to {d['address']} port {d['port']} ({e.strerror or e}).") from None
        return _DirectOut(conn, stall, mac_key)
    except BaseException:
        conn.close()
        raise


def _sanitize_received_config(name):
    """A config that came from another host is rewritten here from the allowlist."""
    return _apply_allowlist(_cdir(name), name, _read_config(name), f"the config {name} arrived with")


def _sanitize_received_snapshots(name):
    """Each snapshot's config that came from another host, rewritten from the allowlist."""
    out = {}
    base = os.path.join(SNAPSHOTS_PATH, name)
    for snap in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        sdir = os.path.join(base, snap)
        if not NAME_RE.fullmatch(snap) or os.path.islink(sdir) or not os.path.isdir(sdir):
            continue
        try:
            lines = _read_lines(os.path.join(sdir, "config"))
        except OSError:
            lines = []  # none, or a symlink: the allowlist's baseline replaces it
        dropped = _apply_allowlist(sdir, name, lines, f"the config of snapshot {snap} as it arrived")
        if dropped:
            out[snap] = dropped
    return out


def cmd_cpuinfo_check(params):
    cpu = os.path.join(_mig_dir(params), "cpu")
    rc, out, err = run(["criu", "cpuinfo", "check", "-D", cpu], timeout=60)
    if rc != 0:
        raise AgentError(
            "This host's CPU cannot run what the source's CPU dumped (criu cpuinfo check).", (err or out)[-3000:]
        )
    return {"cpu_compatible": True}


# --- post-copy (lazy pages) ---------------------------------------------------------------
# The source's `criu dump --lazy-pages` (run by lxc-checkpoint -s, options from
# CRIU_CONFIG_FILE) writes the images without memory pages, then serves the pages from the
# frozen tasks over a socketpair (--ps-socket: no port) to the source's page relay. On the
# target, `criu lazy-pages --page-server --ps-socket` talks over another socketpair to the
# target's page relay. The two relays speak a resumable protocol (offsets, acks, a hello
# on every reconnection) over whatever the dashboard provides: `pages-attach` channels it
# opens on both hosts and pumps between, and re-opens after any link or worker fault. So
# neither CRIU process ever sees its connection close until the target holds every page.
# The long-lived processes run detached under a small watcher that records their exit
# status, so later subcommands can wait for them.

LAZY_DUMP = "lazy-dump"  # <mig dir>/lazy-dump.{json,out,rc}: the source's dump + page server
LAZY_PAGES = "lazy-pages"  # <mig dir>/lazy-pages.{json,out,rc}: the target's lazy-pages daemon
PAGE_RELAY = "page-relay"  # <mig dir>/page-relay.{json,out,rc}: this host's page relay
RELAY_VERSION = 1  # the resumable page relay's protocol (the probe reports it)


def _spawn_watched(argv, mdir, tag, env=None, keep_fd=None):
    """Start argv detached (own session, stdio to <tag>.out) under a watcher process that
    writes its exit status to <tag>.rc. Returns {"pid", "watcher"} once it runs.
    `keep_fd` is handed to the program as its descriptor 3 (e.g. CRIU's --ps-socket)."""
    out_path, rc_path, info_path = (os.path.join(mdir, f"{tag}.{ext}") for ext in ("out", "rc", "json"))
    for path in (rc_path, info_path):
        if os.path.exists(path):
            os.unlink(path)
    pid = os.fork()
    if pid == 0:  # first child: detach, then fork the watcher and leave
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(devnull, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            if keep_fd is not None:
                os.dup2(keep_fd, 3)  # inheritable: dup2 clears O_CLOEXEC
                os.closerange(4, 1 << 16)
            else:
                os.closerange(3, 1 << 16)
            if os.fork() != 0:
                os._exit(0)
            try:
                kept = (3,) if keep_fd is not None else ()
                p = subprocess.Popen(
                    argv, stdin=0, stdout=1, stderr=2, env=env, close_fds=True, pass_fds=kept, umask=CHILD_UMASK
                )
                if kept:
                    os.close(3)  # only the program holds it: its end is the program's end
            except OSError as e:
                _write_json(rc_path + ".json", {"rc": 127, "error": str(e)})
                os.replace(rc_path + ".json", rc_path)
                os._exit(0)
            _write_json(
                info_path,
                {
                    "pid": p.pid,
                    "watcher": os.getpid(),
                    # A pid names its process only with its start time: after the host
                    # restarted (a crash), a new process may have the same pid.
                    "pid_start": _starttime(p.pid),
                    "watcher_start": _starttime(os.getpid()),
                    "argv": argv,
                    "started": time.time(),
                },
            )
            rc = p.wait()
            _write_json(rc_path + ".json", {"rc": rc, "ended": time.time()})
            os.replace(rc_path + ".json", rc_path)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    for _ in range(100):
        info = _read_json(info_path)
        if info or os.path.exists(rc_path):
            return info or {}
        time.sleep(0.02)
    raise AgentError(f"{argv[0]} did not start.")


def _watched_rc(mdir, tag):
    """The exit status of a watched process, or None while it runs."""
    data = _read_json(os.path.join(mdir, f"{tag}.rc"))
    if data is not None:
        return data.get("rc")
    info = _read_json(os.path.join(mdir, f"{tag}.json"))
    if not info or not _pid_alive(info.get("watcher"), info.get("watcher_start")):
        return -1 if info else None  # the watcher died without a word (or the host restarted)
    return None


def _starttime(pid):
    """When a process started (clock ticks since boot), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[-1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid, start=None):
    """Is pid alive, and (when its start time was recorded) still the same process?"""
    if not isinstance(pid, int) or pid <= 1:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[-1].split()
    except OSError:
        return False
    if fields[0] == "Z":
        return False
    return start is None or fields[19] == str(start)


def _kill_watched(mdir, tag, sig=15):
    info = _read_json(os.path.join(mdir, f"{tag}.json")) or {}
    pid = info.get("pid")
    if _watched_rc(mdir, tag) is None and _pid_alive(pid, info.get("pid_start")):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
        return True
    return False


def _tail(path, n=40):
    try:
        with open(path, errors="replace") as f:
            return "\n".join(f.read().splitlines()[-n:])
    except OSError:
        return ""


def _listening(port):
    """Is something listening on 127.0.0.1:port (or any address) in this network namespace?"""
    want = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    try:
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[1] in want and parts[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def _criu_config(mdir, tag, lines):
    path = os.path.join(mdir, f"criu-{tag}.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return dict(os.environ, CRIU_CONFIG_FILE=path)


def _private_dir(mdir):
    """The migration's directory holds the page relay's socket and status: root only."""
    os.makedirs(mdir, exist_ok=True)
    os.chmod(mdir, 0o700)


def _start_relay(mdir, role):
    """Start this host's page relay for a post-copy; return the socket CRIU must use.
    CRIU gets the other end of a socketpair as --ps-socket: no port is ever opened."""
    _private_dir(mdir)
    mine, criu_end = socket.socketpair()
    try:
        env = dict(os.environ, CTWEB_RELAY=json.dumps({"dir": mdir, "role": role}))
        _spawn_watched([sys.executable, os.path.abspath(__file__), "pages-relay"], mdir, PAGE_RELAY, env, mine.fileno())
    finally:
        mine.close()
    return criu_end


def _lazy_dump(name, mdir, images):
    """Start the lazy dump; return once the images are written. CRIU's page server then
    serves the frozen tasks' memory over a socketpair to this host's page relay."""
    criu_end = _start_relay(mdir, "source")
    env = _criu_config(mdir, "dump", ["lazy-pages", "ps-socket 3"])
    argv = ["lxc-checkpoint", "-n", name, "-D", images, "-s"]
    t0 = time.monotonic()
    try:
        _spawn_watched(argv, mdir, LAZY_DUMP, env, criu_end.fileno())
    finally:
        criu_end.close()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        rc = _watched_rc(mdir, LAZY_DUMP)
        if rc is not None:
            _kill_watched(mdir, PAGE_RELAY)
            details = _criu_log(images, "dump")
            out = _tail(os.path.join(mdir, f"{LAZY_DUMP}.out"))
            if out.strip():
                details += "\n--- lxc-checkpoint ---\n" + out
            raise AgentError(
                f"CRIU could not dump {name} lazily (lxc-checkpoint exit status {rc}).",
                details,
                {"state": _state(name), "has_saved_state": _has_saved_state(name)},
            )
        if os.path.isfile(os.path.join(images, "inventory.img")):
            # CRIU writes the inventory last, then serves pages on the socketpair.
            time.sleep(0.05)
            if _watched_rc(mdir, LAZY_DUMP) is None:
                return _ms(t0)
            continue
        time.sleep(0.02)
    _kill_watched(mdir, LAZY_DUMP)
    raise AgentError(f"The lazy dump of {name} did not start its page server within 300 s.", _criu_log(images, "dump"))


# The relays' frames: type (1 byte), value (8), payload length (4), payload.
_F_HELLO, _F_DATA, _F_ACK, _F_FIN, _F_ABORT = 1, 2, 3, 4, 5
_FRAME = struct.Struct(">BQI")
_RELAY_CHUNK = 256 * 1024
_RELAY_WINDOW = 64 * 1024 * 1024  # unacknowledged bytes held before CRIU is read no further


class _Relay:
    """One host's end of the page path: CRIU's socket on one side, the current attach
    connection (to the other host's relay, through the dashboard) on the other. Every byte
    from CRIU is kept until the peer acknowledges it; a new attach starts with a HELLO
    saying how much each side has, and the rest is sent again."""

    def __init__(self, mdir, role, criu_sock):
        self.mdir, self.role, self.criu = mdir, role, criu_sock
        self.criu.setblocking(False)
        self.out = bytearray()  # from CRIU, not yet acknowledged by the peer
        self.out_base = 0  # offset of out[0]
        self.sent = 0  # offset sent on the current link
        self.to_criu = bytearray()
        self.received = 0  # bytes from the peer, in order
        self.acked_sent = 0
        self.local_end = None  # "fin" or "abort" once CRIU's side ended
        self.peer_end = None  # ("fin", total) or ("abort", None)
        self.criu_shut = False
        self.link = None
        self.link_ready = False  # the peer's HELLO arrived on this link
        self.inbuf = bytearray()
        self.outq = bytearray()
        self.attaches = 0
        self.done_at = None
        self.last_ack_t = 0.0
        self.last_status = 0.0
        self._end_sent = None  # the link the FIN/ABORT went out on

    # --- the link -------------------------------------------------------------
    def attach(self, conn):
        if self.link is not None:
            self.link.close()
        conn.setblocking(False)
        self.link, self.link_ready, self.inbuf, self.outq = conn, False, bytearray(), bytearray()
        self.attaches += 1
        self._frame(_F_HELLO, self.received)

    def drop_link(self):
        if self.link is not None:
            self.link.close()
        self.link, self.link_ready = None, False

    def _frame(self, kind, value, payload=b""):
        self.outq += _FRAME.pack(kind, value, len(payload)) + payload

    def on_frames(self):
        while len(self.inbuf) >= _FRAME.size:
            kind, value, n = _FRAME.unpack_from(self.inbuf)
            if n > 4 * _RELAY_CHUNK or kind not in (1, 2, 3, 4, 5):
                raise ValueError("bad frame")
            if len(self.inbuf) < _FRAME.size + n:
                return
            payload = bytes(self.inbuf[_FRAME.size : _FRAME.size + n])
            del self.inbuf[: _FRAME.size + n]
            if kind == _F_HELLO:
                self._acked(value)
                self.sent = max(value, self.out_base)
                self.link_ready = True
            elif kind == _F_DATA:
                if value > self.received:
                    raise ValueError("a gap in the peer's data")
                fresh = payload[self.received - value :]
                self.to_criu += fresh
                self.received += len(fresh)
            elif kind == _F_ACK:
                self._acked(value)
            elif kind == _F_FIN:
                self.peer_end = ("fin", value)
            elif kind == _F_ABORT:
                self.peer_end = ("abort", None)

    def _acked(self, upto):
        if upto > self.out_base:
            del self.out[: upto - self.out_base]
            self.out_base = upto

    def fill_link(self):
        if not self.link_ready:
            return
        while len(self.outq) < 2 * _RELAY_CHUNK:
            end = self.out_base + len(self.out)
            if self.sent < end:
                a = self.sent - self.out_base
                chunk = bytes(self.out[a : a + _RELAY_CHUNK])
                self._frame(_F_DATA, self.sent, chunk)
                self.sent += len(chunk)
                continue
            break
        now = time.monotonic()
        if self.received > self.acked_sent and (
            self.received - self.acked_sent >= 1 << 20 or now - self.last_ack_t >= 0.2
        ):
            self._frame(_F_ACK, self.received)
            self.acked_sent, self.last_ack_t = self.received, now
        if self.local_end and self.sent == self.out_base + len(self.out) and self._end_sent is not self.link:
            total = self.out_base + len(self.out)
            self._frame(_F_FIN if self.local_end == "fin" else _F_ABORT, total)
            self._end_sent = self.link

    # --- CRIU's side --------------------------------------------------------------
    def criu_ended(self):
        """CRIU closed its side: its normal end (the target pulled every page; the source's
        page server finished), or a death (then the peer must not end its CRIU)."""
        if self.role == "source" and self.criu_shut:
            self.local_end = "fin"  # we ended it: the target has every page
            return
        tag = LAZY_PAGES if self.role == "target" else LAZY_DUMP
        rc = None
        for _ in range(100):  # its watcher records the status just after the end
            rc = _watched_rc(self.mdir, tag)
            if rc is not None:
                break
            time.sleep(0.05)
        self.local_end = "fin" if rc == 0 else "abort"

    def status(self, force=False):
        now = time.monotonic()
        if not force and now - self.last_status < 0.5:
            return
        self.last_status = now
        _write_json(
            os.path.join(self.mdir, "page-relay-status.json"),
            {
                "role": self.role,
                "from_criu": self.out_base + len(self.out),
                "acked_by_peer": self.out_base,
                "from_peer": self.received,
                "attached": self.link is not None,
                "attaches": self.attaches,
                "local_end": self.local_end,
                "peer_end": self.peer_end[0] if self.peer_end else None,
                "updated": time.time(),
            },
        )

    def finished(self):
        now = time.monotonic()
        if self.local_end == "abort":
            # Our CRIU is gone, so nothing is left to protect here: tell the peer, then go.
            self.done_at = self.done_at or now
            told = self._end_sent is not None and not self.outq
            return told or self.peer_end is not None or now - self.done_at > 30
        if self.local_end is None or self.peer_end is None:
            return False
        if self.peer_end[0] == "fin" and (self.received < self.peer_end[1] or self.to_criu):
            return False
        if self.out or self.outq:
            self.done_at = self.done_at or now
            return now - self.done_at > 30  # the peer's last acknowledgement may still come
        return True


def cmd_pages_relay(params):
    """The page relay (started detached by migrate-dump or migrate-restore, never by the
    dashboard): runs until both CRIU processes are done with each other."""
    cfg = json.loads(os.environ.get("CTWEB_RELAY", "{}"))
    mdir, role = cfg["dir"], cfg["role"]
    criu_sock = socket.socket(fileno=3)
    path = os.path.join(mdir, "page-relay.sock")
    if os.path.lexists(path):
        os.unlink(path)
    old = os.umask(0o077)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.umask(old)
    os.chmod(path, 0o600)
    listener.listen(4)
    listener.setblocking(False)
    r = _Relay(mdir, role, criu_sock)
    throttle = _relay_throttle(mdir)
    checked = time.monotonic()

    while not r.finished():
        rd, wr = [listener], []
        if r.local_end is None and len(r.out) < _RELAY_WINDOW:
            rd.append(r.criu)
        if r.to_criu and not r.criu_shut:
            wr.append(r.criu)
        if r.link is not None:
            rd.append(r.link)
            r.fill_link()
            if r.outq:
                wr.append(r.link)
        try:
            readable, writable, _ = select.select(rd, wr, [], 0.2)
        except ValueError:
            readable, writable = [], []
        if listener in readable:
            try:
                conn, _ = listener.accept()
                r.attach(conn)
            except OSError:
                pass
        if r.criu in readable:
            try:
                data = r.criu.recv(_RELAY_CHUNK)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                r.criu_ended()
            elif data:
                r.out += data
        if r.criu in writable and r.to_criu:
            try:
                n = r.criu.send(r.to_criu[:_RELAY_CHUNK])
                del r.to_criu[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                r.criu_shut = True
                r.to_criu.clear()
        if r.link is not None and r.link in readable:
            try:
                data = r.link.recv(_RELAY_CHUNK)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                r.drop_link()
            elif data:
                r.inbuf += data
                try:
                    r.on_frames()
                except ValueError:
                    r.drop_link()
        if r.link is not None and r.link in writable and r.outq:
            try:
                n = r.link.send(r.outq[: throttle or _RELAY_CHUNK])
                del r.outq[:n]
                if throttle:
                    time.sleep(0.1)  # test-only throttle: about 10 x throttle bytes a second
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                r.drop_link()
        # The peer's CRIU finished normally and we delivered all it sent: end ours too
        # (the source's page server takes the end for "all served" and finishes the dump).
        if r.peer_end and r.peer_end[0] == "fin" and r.received >= r.peer_end[1] and not r.to_criu:
            if not r.criu_shut:
                try:
                    r.criu.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                r.criu_shut = True
        r.status()
        if time.monotonic() - checked >= 0.5:  # a test may write its throttle just after we started
            throttle, checked = _relay_throttle(mdir), time.monotonic()
    if r.link is not None:
        r.fill_link()
        try:
            r.link.setblocking(True)
            r.link.settimeout(5)
            r.link.sendall(r.outq)
        except OSError:
            pass
    r.status(force=True)
    return {"role": role, "from_criu": r.out_base + len(r.out), "from_peer": r.received}


def _relay_throttle(mdir):
    """Tests only: a throttle file the test itself writes into the migration directory
    (root-only, made for this one migration) slows the relay so a fault can hit the pull.
    Production never writes it; its presence is reported in the relay's status."""
    try:
        with open(os.path.join(mdir, "TEST-ONLY-throttle")) as f:
            return max(1024, int(f.read().strip()))
    except (OSError, ValueError):
        return 0


def cmd_pages_attach(params):
    """Bridge this SSH channel to the migration's page relay (the dashboard pumps bytes
    between the two hosts' attach channels)."""
    check_name(params.get("name"))
    path = os.path.join(_mig_dir(params), "page-relay.sock")
    sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sk.connect(path)
    except OSError as e:
        raise AgentError(f"No page relay runs for this migration here ({e.strerror}).") from None
    fds = [0, sk.fileno()]
    while True:
        readable, _, _ = select.select(fds, [], [])
        if 0 in readable:
            data = os.read(0, _RELAY_CHUNK)
            if not data:
                break
            sk.sendall(data)
        if sk.fileno() in readable:
            data = sk.recv(_RELAY_CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                n = os.write(1, view)
                view = view[n:]
    return None


def cmd_migrate_dump(params):
    name = _require(params.get("name"))
    lazy = _flag(params, "lazy", False)
    mdir = _mig_dir(params)
    images = os.path.join(mdir, "images")
    _remove_tree(images) if os.path.exists(images) else None
    os.makedirs(images)
    t0 = time.monotonic()
    event("dump", f"dumping {name}" + (" without its memory pages (lazy)" if lazy else ""), 10)
    if lazy:
        ms = _lazy_dump(name, mdir, images)
        event("dump", f"images written after {ms} ms; the page server serves this host's page relay", 90)
        return {
            "state": _state(name),
            "relay": RELAY_VERSION,
            "stats": {"total_ms": _ms(t0)},
            "images_bytes": _du(images),
            "pages_bytes": _pages_bytes(images),  # what CRIU could not leave to the page server
        }
    _criu_dump(name, images, stop=True)
    stats = _criu_stats(images, "dump")
    stats["total_ms"] = _ms(t0)
    return {"state": _state(name), "stats": stats, "images_bytes": _du(images), "pages_bytes": _pages_bytes(images)}


def _pages_bytes(images):
    """Bytes of memory pages inside the images (CRIU's pages-N.img files): they travel with the images."""
    return sum(f["size"] for f in _image_files(images) if re.fullmatch(r"pages-\d+\.img", f["name"]))


def _start_lazy_pages(name, mdir, images):
    criu_end = _start_relay(mdir, "target")
    argv = ["criu", "lazy-pages", "--page-server", "--ps-socket", "3"]
    argv += ["-D", images, "-o", "lazy-pages.log", "-v4"]
    try:
        _spawn_watched(argv, mdir, LAZY_PAGES, None, criu_end.fileno())
    finally:
        criu_end.close()
    sock = os.path.join(images, "lazy-pages.socket")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rc = _watched_rc(mdir, LAZY_PAGES)
        if rc is not None:
            _kill_watched(mdir, PAGE_RELAY)
            raise AgentError(
                f"criu lazy-pages ended at once (exit status {rc}).",
                _criu_log(images, "lazy-pages") + "\n" + _tail(os.path.join(mdir, f"{LAZY_PAGES}.out")),
                {"state": _state(name)},
            )
        if os.path.exists(sock):
            return
        time.sleep(0.02)
    _kill_watched(mdir, LAZY_PAGES)
    _kill_watched(mdir, PAGE_RELAY)
    raise AgentError("criu lazy-pages did not open its socket within 30 s.", _criu_log(images, "lazy-pages"))


def cmd_migrate_restore(params):
    name = _require(params.get("name"))
    lazy = _flag(params, "lazy", False)
    mdir = _mig_dir(params)
    images = os.path.join(mdir, "images")
    t0 = time.monotonic()
    env = None
    if lazy:
        event("restore", "starting criu lazy-pages and this host's page relay", 5)
        _start_lazy_pages(name, mdir, images)
        env = _criu_config(mdir, "restore", ["lazy-pages"])
    event("restore", f"restoring {name}" + (" (memory follows lazily)" if lazy else ""), 10)
    try:
        _criu_restore(name, images, f"CRIU could not restore {name} on this host", False, env)
    except AgentError as e:
        if lazy:
            _kill_watched(mdir, LAZY_PAGES)
            _kill_watched(mdir, PAGE_RELAY)
            e.details += "\n--- lazy-pages.log ---\n" + _criu_log(images, "lazy-pages")
        raise
    stats = _criu_stats(images, "restore")
    stats["total_ms"] = _ms(t0)
    return {"state": _state(name), "stats": stats}


def cmd_migrate_lazy_wait(params):
    """Wait up to wait_s seconds for a post-copy's long-lived CRIU process to end: role
    "target" waits for the lazy-pages daemon (every page arrived), role "source" for the
    dump's page server. No limit of its own: it returns {"done": false} with the page
    relay's counters, and the dashboard judges progress."""
    name = check_name(params.get("name"))
    role = params.get("role")
    if role not in ("source", "target"):
        raise AgentError("role must be source or target.")
    wait_s = params.get("wait_s", 20)
    if not isinstance(wait_s, (int, float)) or not 0 <= wait_s <= 300:
        raise AgentError("Bad wait_s.")
    mdir = _mig_dir(params)
    images = os.path.join(mdir, "images")
    tag, log = (LAZY_PAGES, "lazy-pages") if role == "target" else (LAZY_DUMP, "dump")
    if not os.path.exists(os.path.join(mdir, f"{tag}.json")) and not os.path.exists(os.path.join(mdir, f"{tag}.rc")):
        raise AgentError(f"No {log} process was started for this migration here.")
    t0 = time.monotonic()
    rc = _watched_rc(mdir, tag)
    while rc is None and time.monotonic() - t0 < wait_s:
        time.sleep(0.1)
        rc = _watched_rc(mdir, tag)
    relay = _read_json(os.path.join(mdir, "page-relay-status.json")) or {}
    if rc is None:
        return {"done": False, "relay": relay, "state": _state(name)}
    if rc != 0:
        raise AgentError(
            f"criu {log} ended with exit status {rc}.",
            _criu_log(images, log) + "\n" + _tail(os.path.join(mdir, f"{tag}.out")),
            {"state": _state(name), "ended": rc, "relay": relay},
        )
    out = {"done": True, "state": _state(name), "relay": relay}
    if role == "source":
        out["stats"] = _criu_stats(images, "dump")
    return out


def cmd_migrate_resume(params):
    """On the source, after the move failed: restore the container from its migration dump.
    If that fails too, the images become its saved state, so Start can try again.
    After a lazy dump the images hold no memory: the source can only go on if the dump
    process still holds its frozen tasks (see _lazy_resume)."""
    name = _require(params.get("name"))
    mdir = _mig_dir(params)
    images = os.path.join(mdir, "images")
    if os.path.exists(os.path.join(mdir, f"{LAZY_DUMP}.json")):
        return _lazy_resume(name, mdir, images)
    try:
        _criu_restore(name, images, f"CRIU could not resume {name} here", True)
    except AgentError as e:
        state_images = _state_images(name)
        if os.path.isfile(os.path.join(images, "inventory.img")) and not os.path.exists(state_images):
            os.makedirs(os.path.dirname(state_images), exist_ok=True)
            os.rename(images, state_images)
        e.data["has_saved_state"] = _has_saved_state(name)
        raise
    return {"state": _state(name), "stats": _criu_stats(images, "restore")}


def _descendants(pid):
    """(pid, comm) of every process below pid."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                head, _, tail = f.read().rpartition(")")
            comm = head.split("(", 1)[1]
            children.setdefault(int(tail.split()[1]), []).append((int(entry), comm))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


def _criu_network_unlock(name):
    """Undo CRIU's network lock in the container's netns. CRIU 4.1 unlocks the network of
    a failed dump before the lazy page server runs, not after it: a rolled-back lazy dump
    leaves its CRIU chain dropping every packet (seen on the lab)."""
    rc, out, err = run(["lxc-info", "-n", name, "-pH"], timeout=20)
    pid = out.strip()
    if rc != 0 or not pid.isdigit():
        return False
    done = False
    for tool in ("iptables", "ip6tables"):
        ns = ["nsenter", "-t", pid, "-n", tool, "-w"]
        rc, out, err = run(ns + ["-S", "CRIU"], timeout=20)
        if rc != 0:
            continue
        for chain in ("INPUT", "OUTPUT"):
            while run(ns + ["-D", chain, "-j", "CRIU"], timeout=20)[0] == 0:
                pass
        run(ns + ["-F", "CRIU"], timeout=20)
        done = run(ns + ["-X", "CRIU"], timeout=20)[0] == 0 or done
    rc, out, err = run(["nsenter", "-t", pid, "-n", "nft", "list", "tables"], timeout=20)
    for line in out.splitlines() if rc == 0 else []:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and parts[2].startswith("CRIU"):
            done = run(["nsenter", "-t", pid, "-n", "nft", "delete", "table", parts[1], parts[2]], timeout=20)[0] == 0
    return done


def _lazy_resume(name, mdir, images):
    """Give the tasks a lazy dump still holds back to the source. Closing the page server
    is no way: CRIU takes an unserved close for success and kills the tasks. An interrupted
    page server is a failed dump, though, and CRIU rolls a failed dump back (the tasks run
    on): its SIGALRM handler (the --timeout one) does not restart syscalls, so SIGALRM makes
    the page server's accept()/recv() fail."""
    info = _read_json(os.path.join(mdir, f"{LAZY_DUMP}.json")) or {}
    signalled = []
    if _watched_rc(mdir, LAZY_DUMP) is None and _pid_alive(info.get("pid"), info.get("pid_start")):
        for pid, comm in _descendants(info["pid"]):
            if comm == "criu":
                try:
                    os.kill(pid, 14)  # SIGALRM
                    signalled.append(pid)
                except OSError:
                    pass
    deadline = time.monotonic() + 60
    while _watched_rc(mdir, LAZY_DUMP) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    state = _state(name)
    if state in ("RUNNING", "FROZEN"):
        _thaw(name)
        unlocked = _criu_network_unlock(name)
        return {
            "state": _state(name),
            "resumed": f"the lazy dump was interrupted (criu {signalled}) and rolled back",
            "network_unlocked": unlocked,
        }
    raise AgentError(
        f"{name} could not be resumed here: its lazy dump holds no memory pages and the dump "
        f"process {'ended' if _watched_rc(mdir, LAZY_DUMP) is not None else 'still runs'}; it is {state}.",
        _criu_log(images, "dump"),
        {"state": state, "has_saved_state": False},
    )


def cmd_migrate_abort(params):
    """On the target: remove only what this migration brought."""
    name = check_name(params.get("name"))
    removed = []
    if os.path.isdir(_mig_dir(params)) and _kill_watched(_mig_dir(params), LAZY_PAGES, 9):
        removed.append("lazy-pages daemon")
    if os.path.isdir(_mig_dir(params)) and _kill_watched(_mig_dir(params), PAGE_RELAY, 9):
        removed.append("page relay")
    if os.path.exists(_mig_marker(name, params)) or os.path.exists(os.path.join(_mig_dir(params), "receiving")):
        if _exists(name) and _state(name) != "STOPPED":
            run(["lxc-stop", "-n", name, "-k"], timeout=60)
            if _state(name) != "STOPPED":
                raise AgentError(f"{name} is still {_state(name)} here and could not be stopped.")
        if _exists(name):
            run(["lxc-destroy", "-n", name], timeout=120)
        if os.path.exists(_cdir(name)):
            shutil.rmtree(_cdir(name), ignore_errors=True)
        if os.path.exists(_cdir(name)):
            raise AgentError(f"{_cdir(name)} could not be removed.")
        removed.append("container")
        for base in (SNAPSHOTS_PATH, STATE_PATH):
            if os.path.exists(os.path.join(base, name)):
                _remove_tree(os.path.join(base, name))
                removed.append(os.path.basename(base))
    if _remove_stages(params):
        removed.append("staging")
    if os.path.exists(_mig_dir(params)):
        _remove_tree(_mig_dir(params))
    return {"removed": removed}


def _end_relay(mdir):
    """Kill the page relay and wait for its watcher's last word (its .rc file): written after
    the directory's removal began, it left the directory behind (seen on the lab)."""
    if _kill_watched(mdir, PAGE_RELAY, 9):
        deadline = time.monotonic() + 5
        while _watched_rc(mdir, PAGE_RELAY) is None and time.monotonic() < deadline:
            time.sleep(0.02)


def cmd_migrate_cleanup(params):
    """On the source: after success remove the container (it runs on the target now);
    with remove=false only the migration's working files."""
    name = check_name(params.get("name"))
    remove = _flag(params, "remove", False)
    if _flag(params, "keep_state", False):
        # The move failed and the target is in doubt: the dump becomes the saved state.
        images = os.path.join(_mig_dir(params), "images")
        lazy = os.path.exists(os.path.join(_mig_dir(params), f"{LAZY_DUMP}.json"))
        if lazy and _watched_rc(_mig_dir(params), LAZY_DUMP) is None:
            # Its page server may still feed a running target: keep everything as it is.
            return {"removed": False, "has_saved_state": False, "lazy_dump_running": True}
        if (
            not lazy  # a lazy dump's images hold no memory: they are no saved state
            and os.path.isfile(os.path.join(images, "inventory.img"))
            and not os.path.exists(_state_images(name))
        ):
            os.makedirs(_state_dir(name), exist_ok=True)
            os.rename(images, _state_images(name))
        if os.path.exists(_mig_dir(params)):
            _end_relay(_mig_dir(params))
            _remove_tree(_mig_dir(params))
        return {"removed": False, "has_saved_state": _has_saved_state(name)}
    if remove and _exists(name):
        if _state(name) != "STOPPED":
            raise AgentError(f"{name} is {_state(name)} here: refusing to remove a running source.")
        run(["lxc-destroy", "-n", name], timeout=120, check=True)
        for base in (SNAPSHOTS_PATH, STATE_PATH):
            if os.path.exists(os.path.join(base, name)):
                _remove_tree(os.path.join(base, name))
    if os.path.exists(_mig_dir(params)):
        if _watched_rc(_mig_dir(params), LAZY_DUMP) is None and os.path.exists(
            os.path.join(_mig_dir(params), f"{LAZY_DUMP}.json")
        ):
            raise AgentError("The lazy dump still holds the frozen tasks here: refusing to remove its files.")
        _end_relay(_mig_dir(params))
        _remove_tree(_mig_dir(params))
    if os.path.lexists(_mig_marker(name, params)):
        os.unlink(_mig_marker(name, params))  # on a target that runs it now: it is simply ours
    return {"removed": remove}


def cmd_inspect(params):
    """What this host holds of a container after a job was cut off (its worker died, its
    link broke): the container and its state, a migration's leftovers, a snapshot's.
    It runs under the container's lock, so it waits for whatever step was still running
    here (a dump goes on after the agent that started it died) and reports where it ended.
    With thaw=true a container left frozen by an interrupted snapshot or dump is thawed
    (never one a post-copy's page server holds frozen on purpose)."""
    name = check_name(params.get("name"))
    exists = _exists(name)
    out = {"exists": exists, "state": _state(name) if exists else None}
    holding = False
    if params.get("migration") is not None:
        mdir = _mig_dir(params)
        lazy = os.path.exists(os.path.join(mdir, f"{LAZY_DUMP}.json"))
        holding = lazy and _watched_rc(mdir, LAZY_DUMP) is None
        out["migration"] = {
            "dir": os.path.isdir(mdir),
            "images": os.path.isfile(os.path.join(mdir, "images", "inventory.img")),
            "receiving": os.path.exists(os.path.join(mdir, "receiving")),
            "received": os.path.exists(_mig_marker(name, params)),
            "lazy_dump": lazy,
            "lazy_dump_running": holding,
            "lazy_pages_running": _watched_rc(mdir, LAZY_PAGES) is None
            and os.path.exists(os.path.join(mdir, f"{LAZY_PAGES}.json")),
        }
    if exists and out["state"] == "FROZEN" and not holding and _flag(params, "thaw", False):
        _thaw(name)
        out["state"] = _state(name)
        out["thawed"] = True
    out["has_saved_state"] = _has_saved_state(name)
    if params.get("snapshot") is not None:
        snap = check_name(params.get("snapshot"), "snapshot")
        tmp = os.path.join(SNAPSHOTS_PATH, name, f".tmp-{snap}")
        if os.path.lexists(tmp):
            _remove_tree(tmp)  # an unfinished copy: no job owns it any more (we hold the lock)
            out["removed_partial"] = True
        out["snapshot"] = _read_json(os.path.join(_snap_dir(name, snap), "meta.json"))
    return out


def _lock(name, wait):
    """Hold <container>.lock for this run (released when the process and any dump it
    started have exited). Waits up to `wait` seconds for another job to finish."""
    global LOCK_FD
    os.makedirs(LOCKS_PATH, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(LOCKS_PATH, name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise AgentError(
                    f"Another ctweb job is still working on {name} on this host; try again when it has finished."
                ) from None
            time.sleep(0.1)
    os.set_inheritable(fd, False)
    # Who holds it, for whoever wonders why a job waits (and for the fault tests).
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {sys.argv[1] if len(sys.argv) > 1 else ''}\n".encode(), 0)
    LOCK_FD = fd


# Subcommands that change a container (or, inspect, wait for what changes it) take its lock.
LOCKED = {
    "create",
    "start",
    "stop",
    "restart",
    "delete",
    "snapshot",
    "restore",
    "delete-snapshot",
    "migrate-prepare",
    "migrate-dump",
    "migrate-restore",
    "migrate-resume",
    "migrate-abort",
    "migrate-cleanup",
    "receive",
    "inspect",
}
LOCK_WAIT_S = {"inspect": 900}  # a dump the agent left behind may take this long to end


COMMANDS = {
    "probe": cmd_probe,
    "list": cmd_list,
    "create": cmd_create,
    "start": cmd_start,
    "stop": cmd_stop,
    "restart": cmd_restart,
    "delete": cmd_delete,
    "snapshot": cmd_snapshot,
    "restore": cmd_restore,
    "delete-snapshot": cmd_delete_snapshot,
    "snapshot-contents": cmd_snapshot_contents,
    "bundle": cmd_bundle,
    "migrate-prepare": cmd_migrate_prepare,
    "migrate-check": cmd_migrate_check,
    "send": cmd_send,
    "receive": cmd_receive,
    "cpuinfo-check": cmd_cpuinfo_check,
    "migrate-dump": cmd_migrate_dump,
    "migrate-restore": cmd_migrate_restore,
    "migrate-resume": cmd_migrate_resume,
    "migrate-lazy-wait": cmd_migrate_lazy_wait,
    "migrate-abort": cmd_migrate_abort,
    "migrate-cleanup": cmd_migrate_cleanup,
    "inspect": cmd_inspect,
    "pages-attach": cmd_pages_attach,
    "pages-relay": cmd_pages_relay,  # started by migrate-dump/-restore only
}
# These write a raw tar on stdout instead of JSON lines; their errors go to stderr
# (unless the tar goes directly to another host: then they print JSON lines too).
RAW_OUTPUT = {"send", "pages-attach"}


def _read_line(fd, limit=1 << 20):
    """The parameters line, read without buffering: `receive` reads a tar from the same
    descriptor right after it, and a buffered reader would keep part of that away."""
    out = bytearray()
    while len(out) < limit:
        b = os.read(fd, 1)
        if not b or b == b"\n":
            break
        out += b
    return bytes(out)


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        emit({"type": "error", "message": "usage: ctweb-agent {{{}}}".format(",".join(sorted(COMMANDS)))})
        return 2
    # Nothing we start may inherit a descriptor from the SSH session: CRIU refuses to
    # dump processes holding files from outside their root (LAB.md).
    # (The page relay keeps its descriptor 3: CRIU's socket, handed over by its starter.)
    os.closerange(4 if argv[1] == "pages-relay" else 3, 1 << 16)
    os.umask(AGENT_UMASK)
    try:
        _private_modes()
    except OSError:
        pass  # never the reason a job fails
    raw = _read_line(0).decode()
    try:
        params = json.loads(raw) if raw.strip() else {}
        if not isinstance(params, dict):
            raise ValueError("parameters must be a JSON object")
    except ValueError as e:
        emit({"type": "error", "message": f"Bad parameters: {e}"})
        return 2
    try:
        if argv[1] in LOCKED and NAME_RE.fullmatch(str(params.get("name", ""))):
            _lock(params["name"], LOCK_WAIT_S.get(argv[1], 30))
    except AgentError as e:
        emit({"type": "error", "message": e.message})
        return 1
    if argv[1] in RAW_OUTPUT and params.get("direct") is None:
        try:
            COMMANDS[argv[1]](params)
        except Exception as e:
            sys.stderr.write(f"{getattr(e, 'message', e)}\n{getattr(e, 'details', '')}\n")
            return 1
        return 0
    try:
        data = COMMANDS[argv[1]](params)
    except AgentError as e:
        emit({"type": "error", "message": e.message, "details": e.details, "data": e.data})
        return 1
    except Exception as e:
        import traceback

        emit({"type": "error", "message": f"agent crashed: {type(e).__name__}: {e}", "details": traceback.format_exc()})
        return 1
    emit({"type": "result", "data": data})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
