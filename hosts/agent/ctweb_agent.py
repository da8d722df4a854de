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
    caps["disk"] = [_disk(LXC_PATH), _disk(CTWEB_PATH)]
    event("probe", "done", 100)
    return caps


COMMANDS = {"probe": cmd_probe}


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
