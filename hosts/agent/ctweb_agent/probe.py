"""`probe`: what this host offers (kernel, CPU, CRIU, LXC, pycriu, templates, network, disk)."""

import os
import platform
import re
import shutil
import socket

from . import state as S
from . import store
from .common import event, run
from .lazy import RELAY_VERSION
from .lxc import _network, _templates

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
    caps["disk"] = [_disk(S.LXC_PATH), _disk(S.CTWEB_PATH)]
    # How snapshots are kept here: sharing, native copy-on-write, zstd (shown on the host page).
    caps["snapshot_storage"] = store.storage_probe()
    # Post-copy pages go through the resumable page relay (CRIU over --ps-socket): its version.
    caps["page_relay"] = RELAY_VERSION
    event("probe", "done", 100)
    return caps
