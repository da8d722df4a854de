"""What a CRIU dump holds: its image files and statistics, decoded with pycriu (processes,
files, sockets, mounts) for `snapshot-contents` and the snapshot's record."""

import glob
import os
import socket

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


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
