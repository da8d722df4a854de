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

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
LXC_PATH = "/var/lib/lxc"
CTWEB_PATH = "/var/lib/ctweb"


class AgentError(Exception):
    def __init__(self, message, details="", data=None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.data = data or {}


def emit(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def event(phase, message, progress=None, **extra):
    msg = {"type": "event", "phase": phase, "message": message, "t": time.time()}
    if progress is not None:
        msg["progress"] = progress
    msg.update(extra)
    emit(msg)


def run(argv, timeout=120, check=False, input=None):
    """Run a command from an argument list; return (returncode, stdout, stderr)."""
    try:
        p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, close_fds=True)
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


def check_name(name):
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AgentError(f"Invalid container name {name!r}.")
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


def _read_config(name):
    with open(_config_path(name)) as f:
        return f.read().splitlines()


def _config_value(lines, key):
    for line in lines:
        k, sep, v = line.partition("=")
        if sep and k.strip() == key:
            return v.strip()
    return None


def _write_config(name, lines):
    path = _config_path(name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


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
    }


def cmd_list(params):
    names = []
    if os.path.isdir(LXC_PATH):
        names = sorted(n for n in os.listdir(LXC_PATH) if NAME_RE.fullmatch(n) and _exists(n))
    return {"containers": [_describe(n) for n in names]}


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
    _write_config(name, lines)


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
    name = _require(params.get("name"))
    if _state(name) == "RUNNING":
        return _describe(name)
    event("start", f"starting {name}", 20)
    _lxc_start(name)
    return _describe(name)


def cmd_stop(params):
    name = _require(params.get("name"))
    event("stop", f"stopping {name}", 20)
    _lxc_stop(name)
    return _describe(name)


def cmd_restart(params):
    name = _require(params.get("name"))
    event("stop", f"stopping {name}", 10)
    _lxc_stop(name)
    event("start", f"starting {name}", 50)
    _lxc_start(name)
    return _describe(name)


def cmd_delete(params):
    name = _require(params.get("name"))
    event("stop", f"stopping {name}", 20)
    _lxc_stop(name)
    event("delete", f"destroying {name}", 60)
    rc, out, err = run(["lxc-destroy", "-n", name], timeout=120)
    if rc != 0 or _exists(name):
        raise AgentError(f"lxc-destroy failed for {name}.", (err or out)[-2000:], {"state": _state(name)})
    return {"name": name, "state": "STOPPED", "deleted": True}


COMMANDS = {
    "probe": cmd_probe,
    "list": cmd_list,
    "create": cmd_create,
    "start": cmd_start,
    "stop": cmd_stop,
    "restart": cmd_restart,
    "delete": cmd_delete,
}


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        emit({"type": "error", "message": "usage: ctweb-agent {{{}}}".format(",".join(sorted(COMMANDS)))})
        return 2
    # Nothing we start may inherit a descriptor from the SSH session: CRIU refuses to
    # dump processes holding files from outside their root (LAB.md).
    os.closerange(3, 1 << 16)
    raw = sys.stdin.readline()
    try:
        params = json.loads(raw) if raw.strip() else {}
        if not isinstance(params, dict):
            raise ValueError("parameters must be a JSON object")
    except ValueError as e:
        emit({"type": "error", "message": f"Bad parameters: {e}"})
        return 2
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
