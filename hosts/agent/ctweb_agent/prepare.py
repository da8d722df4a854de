"""`prepare`: the host side of preparing a host for ctweb, one step per call.

The dashboard decides what a host needs (hosts/prepare.py `plan`); this only reports facts and
carries out a step: `facts`, `packages` (apt-get, from this host's own apt sources), `network`
(the container bridge and /etc/ctweb/network.json, which the probe reads), `check` (criu
check, pycriu, LXC). Every program runs from an argument list; package and suite names are
checked against a strict pattern before apt-get sees them.
"""

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys

from .common import AgentError, event, run

PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]{0,62}$")
SUITE_RE = re.compile(r"^[a-z][a-z0-9-]{1,30}$")
BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
NETWORK_FILE = "/etc/ctweb/network.json"
LXC_NET_DEFAULTS = "/etc/default/lxc-net"
EXTRA_LIST = "/etc/apt/sources.list.d/ctweb-criu.list"
EXTRA_PIN = "/etc/apt/preferences.d/ctweb-criu"
APT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
APT_OPTS = ["-y", "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]


def _os_release():
    out = {}
    try:
        with open("/etc/os-release") as f:
            for line in f:
                k, sep, v = line.strip().partition("=")
                if sep:
                    out[k] = v.strip().strip('"')
    except OSError:
        pass
    return out


def _facts():
    rel = _os_release()
    try:
        import pwd

        user = pwd.getpwuid(os.geteuid()).pw_name
    except (KeyError, ImportError):
        user = str(os.geteuid())
    return {
        "os_id": rel.get("ID", ""),
        "version_id": rel.get("VERSION_ID", ""),
        "codename": rel.get("VERSION_CODENAME", ""),
        "pretty_name": rel.get("PRETTY_NAME", ""),
        "kernel": os.uname().release,
        "arch": os.uname().machine,
        "root": os.geteuid() == 0,
        "user": user,
        "sudo_user": os.environ.get("SUDO_USER") or None,  # the SSH user, when sudo runs the agent
        "apt": shutil.which("apt-get") is not None,
        "systemd": os.path.isdir("/run/systemd/system"),
    }


def _apt(args, phase, base, span, expect=0):
    """Run apt-get with args; events from its progress lines (Unpacking/Setting up), mapped
    onto base..base+span of this step. Returns its output tail; AgentError when it fails."""
    proc = subprocess.Popen(
        ["apt-get", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=APT_ENV,
        close_fds=True,
    )
    tail, done = [], 0
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-60:]
        if line.startswith(("Unpacking ", "Setting up ")) and expect:
            done += 1
            event(phase, line[:200], base + span * min(1.0, done / (2 * expect)))
        elif line.startswith(("Get:", "Hit:", "Err:", "E:")):
            event(phase, line[:200])
    rc = proc.wait()
    if rc != 0:
        errors = [ln for ln in tail if ln.startswith(("E:", "Err:"))]
        raise AgentError(
            "apt-get {} failed on this host (exit status {}){}".format(
                args[-1] if args[-1] == "update" else "install", rc, ": " + errors[-1] if errors else "."
            ),
            "\n".join(tail),
        )
    return tail


def _mirror(codename):
    """The Debian/Ubuntu mirror this host already uses for its own release."""
    found = None
    paths = ["/etc/apt/sources.list"]
    if os.path.isdir("/etc/apt/sources.list.d"):
        paths += [os.path.join("/etc/apt/sources.list.d", n) for n in sorted(os.listdir("/etc/apt/sources.list.d"))]
    for path in paths:
        if path == EXTRA_LIST:
            continue
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        if path.endswith(".sources"):
            for stanza in text.split("\n\n"):
                fields = dict(
                    (k.strip().lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in stanza.splitlines())
                )
                if codename in fields.get("suites", "").split() and fields.get("uris"):
                    found = found or fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb":
                    rest = [p for p in parts[1:] if not p.startswith("[")]
                    if len(rest) >= 2 and rest[1] == codename:
                        found = found or rest[0]
    if not found or not re.fullmatch(r"https?://[A-Za-z0-9.:/_-]+", found):
        raise AgentError(f"No apt source for {codename} found on this host to take the newer CRIU from.")
    return found.rstrip("/")


def _write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".ctweb-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _keep_bridge(bridge):
    """An existing bridge that lxc-net did not make is the admin's: tell lxc-net to leave it
    alone before the lxc package is installed (its start would otherwise remove and remake it)."""
    if not os.path.isdir(f"/sys/class/net/{bridge}/bridge") or os.path.exists("/run/lxc/network_up"):
        return False
    try:
        with open(LXC_NET_DEFAULTS) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    lines = [ln for ln in lines if not ln.strip().startswith("USE_LXC_BRIDGE=")]
    _write(LXC_NET_DEFAULTS, "\n".join(['USE_LXC_BRIDGE="false"', *lines]) + "\n")
    return True


def _versions(packages):
    rc, out, _ = run(["dpkg-query", "-W", "-f", "${Package} ${Version} ${db:Status-Abbrev}\\n", *packages], timeout=60)
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2].startswith("ii"):
            found[parts[0]] = parts[1]
    return found


def _packages(params):
    packages = params.get("packages") or []
    extra = params.get("extra_packages") or []
    suite = params.get("extra_suite")
    if not isinstance(packages, list) or not isinstance(extra, list) or not packages:
        raise AgentError("Bad parameters: packages must be a non-empty list.")
    for name in packages + extra:
        if not isinstance(name, str) or not PACKAGE_RE.fullmatch(name):
            raise AgentError(f"Bad parameters: {name!r} is not a package name.")
    if extra and (not isinstance(suite, str) or not SUITE_RE.fullmatch(suite)):
        raise AgentError("Bad parameters: extra_suite must name a suite.")
    kept = _keep_bridge(params.get("bridge") or "lxcbr0")
    if kept:
        event("packages", "the existing container bridge stays as it is (lxc-net told to leave it)")
    if extra:
        mirror = _mirror(_facts()["codename"])
        _write(EXTRA_LIST, f"deb {mirror} {suite} main\n")
        _write(EXTRA_PIN, f"Package: *\nPin: release n={suite}\nPin-Priority: 100\n")
        event("packages", f"apt source {mirror} {suite} added for {', '.join(extra)} only (pinned at 100)")
    event("packages", "updating the package lists", 2)
    _apt(["-q", "update"], "packages", 2, 0)
    event("packages", f"installing {len(packages)} packages", 15)
    _apt([*APT_OPTS, "-q", "--no-install-recommends", "install", *packages], "packages", 15, 60, expect=len(packages))
    if extra:
        event("packages", f"installing {', '.join(extra)} from {suite}", 80)
        _apt([*APT_OPTS, "-q", "--no-install-recommends", "-t", suite, "install", *extra], "packages", 80, 18, expect=3)
    found = _versions(packages + extra)
    missing = [p for p in packages + extra if p not in found]
    if missing:
        raise AgentError(f"apt-get ended but these packages are not installed: {', '.join(missing)}.")
    event("packages", "installed: " + ", ".join(f"{p} {v}" for p, v in sorted(found.items())), 100)
    return {"packages": found}


def _bridge_ipv4(bridge):
    rc, out, _ = run(["ip", "-4", "-o", "addr", "show", "dev", bridge], timeout=20)
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            return ipaddress.ip_interface(parts[parts.index("inet") + 1])
    return None


def check_network(network):
    """The description to write, validated here again (bytes from the dashboard are input too)."""
    if not isinstance(network, dict):
        raise AgentError("Bad parameters: network must be an object.")
    bridge = network.get("bridge")
    if not isinstance(bridge, str) or not BRIDGE_RE.fullmatch(bridge):
        raise AgentError("Bad parameters: network.bridge is not an interface name.")
    try:
        subnet = ipaddress.IPv4Network(network.get("subnet"))
    except (ValueError, TypeError):
        raise AgentError("Bad parameters: network.subnet is not an IPv4 network.") from None
    rng = network.get("range")
    if not (
        isinstance(rng, list) and len(rng) == 2 and all(type(n) is int for n in rng) and 1 <= rng[0] <= rng[1] <= 254
    ):
        raise AgentError("Bad parameters: network.range must be [first, last] between 1 and 254.")
    gateway = network.get("gateway")
    if gateway is not None:
        try:
            if ipaddress.IPv4Address(gateway) not in subnet:
                raise ValueError
        except (ValueError, TypeError):
            raise AgentError("Bad parameters: network.gateway is not an address of network.subnet.") from None
    return {"subnet": str(subnet), "bridge": bridge, "range": rng, "gateway": gateway}


def _start_lxc_net():
    if os.path.isdir("/run/systemd/system"):
        return run(["systemctl", "restart", "lxc-net"], timeout=120)
    if os.path.exists("/etc/init.d/lxc-net"):
        return run(["/etc/init.d/lxc-net", "restart"], timeout=120)
    return 127, "", "lxc-net is not installed"


def _has_bridge(bridge):
    return os.path.isdir(f"/sys/class/net/{bridge}/bridge")


def _network(params):
    """Write /etc/ctweb/network.json: the network given, else the one described already, else
    one made from the bridge's own address (lxc-net makes lxcbr0 when it is missing)."""
    given = params.get("network")
    if given is not None:
        given = check_network(given)
        bridge = given["bridge"]
    else:
        bridge = params.get("bridge") or "lxcbr0"
        if not isinstance(bridge, str) or not BRIDGE_RE.fullmatch(bridge):
            raise AgentError("Bad parameters: bridge is not an interface name.")
        try:
            with open(NETWORK_FILE) as f:
                current = json.load(f)
        except (OSError, ValueError):
            current = None
        if isinstance(current, dict) and current.get("bridge"):
            try:
                given = check_network({"range": [100, 250], "gateway": None, **current})
            except AgentError as e:
                raise AgentError(
                    f"{NETWORK_FILE} on this host is not a valid description ({e.message}): give a network to "
                    "prepare to replace it."
                ) from None
            bridge = given["bridge"]
    if not _has_bridge(bridge):
        if bridge != "lxcbr0" or given is not None:
            raise AgentError(
                f"This host has no bridge {bridge}: create it, or prepare without a network and lxc-net makes "
                "lxcbr0 (10.0.3.0/24), then prepare again."
            )
        event("network", "starting lxc-net, which makes lxcbr0 (USE_LXC_BRIDGE in /etc/default/lxc-net)", 30)
        rc, out, err = _start_lxc_net()
        if not _has_bridge(bridge):
            raise AgentError(
                f"This host has no bridge {bridge} and lxc-net did not make one: create the bridge, or "
                "describe the one to use (network.bridge), then prepare again.",
                (out + err)[-2000:],
            )
    iface = _bridge_ipv4(bridge)
    if given is None:
        if iface is None:
            raise AgentError(
                f"The bridge {bridge} has no IPv4 address, so its container network cannot be guessed: "
                "give network.subnet (and range, gateway) to prepare."
            )
        given = check_network(
            {"bridge": bridge, "subnet": str(iface.network), "range": [100, 250], "gateway": str(iface.ip)}
        )
    elif iface is not None and iface.ip not in ipaddress.ip_network(given["subnet"]):
        raise AgentError(
            f"The bridge {bridge} has the address {iface.ip}, outside the container network {given['subnet']}: "
            "give the bridge's own network, or another bridge."
        )
    os.makedirs(os.path.dirname(NETWORK_FILE), mode=0o755, exist_ok=True)
    _write(NETWORK_FILE, json.dumps(given) + "\n")
    event(
        "network",
        f"{NETWORK_FILE}: {given['subnet']} on {bridge}, addresses .{given['range'][0]}-.{given['range'][1]}",
        100,
    )
    return given


def _check(params):
    rc, out, err = run(["criu", "--version"], timeout=30)
    if rc != 0:
        raise AgentError("CRIU is not installed on this host.", (out + err)[-2000:])
    m = re.search(r"Version:\s*(\S+)", out + err)
    version = m.group(1) if m else "?"
    event("check", f"criu {version}: criu check", 10)
    rc, out, err = run(["criu", "check"], timeout=120)
    text = (out + err).strip()
    if rc != 0 or "Looks good" not in text:
        first = next(
            (ln for ln in text.splitlines() if re.search(r"Error|error|Unexpected|Can't|fail", ln)), text[:200]
        )
        raise AgentError(
            f"CRIU {version} does not work on this host's kernel {os.uname().release}: {first.strip()}", text[-4000:]
        )
    event("check", "criu check: looks good", 50)
    rc, out, err = run([sys.executable, "-c", "import pycriu"], timeout=60)
    if rc != 0:
        raise AgentError("pycriu cannot be imported on this host.", (out + err)[-2000:])
    for tool in ("lxc-start", "lxc-checkpoint", "iptables-restore", "rsync"):
        if shutil.which(tool) is None:
            raise AgentError(f"{tool} is missing on this host after the install.")
    rc, out, err = run(["lxc-start", "--version"], timeout=30)
    event("check", f"pycriu imports; LXC {out.strip() or '?'}; iptables and rsync present", 100)
    return {"criu_version": version, "criu_check": "ok", "lxc_version": out.strip()}


STEPS = {"facts": lambda p: _facts(), "packages": _packages, "network": _network, "check": _check}


def cmd_prepare(params):
    step = params.get("step")
    if step not in STEPS:
        raise AgentError(f"Bad parameters: step must be one of {', '.join(STEPS)}.")
    if step != "facts" and os.geteuid() != 0:
        raise AgentError("Preparing this host needs root.")
    return STEPS[step](params)
