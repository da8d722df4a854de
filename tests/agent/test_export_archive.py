"""A snapshot's export archive: written by the agent, checked by the one verifier the dashboard
and the agent's import share (exports.scan), and imported as a new container. Hostile archives
are refused with a sentence, and a refused import leaves nothing on the host."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import threading
from pathlib import Path

import pytest


def _snapshot(agent, name="c1", snap="s1", stateful=True):
    """A snapshot as the agent keeps one (config, meta.json, rootfs, images)."""
    sdir = Path(agent.S.SNAPSHOTS_PATH) / name / snap
    (sdir / "rootfs" / "etc").mkdir(parents=True)
    (sdir / "rootfs" / "etc" / "hostname").write_text(name + "\n")
    (sdir / "rootfs" / "bin").mkdir()
    (sdir / "rootfs" / "bin" / "busybox").write_bytes(b"\x7fELF" + b"b" * 5000)
    os.link(sdir / "rootfs" / "bin" / "busybox", sdir / "rootfs" / "bin" / "sh")
    (sdir / "rootfs" / "bin" / "ls").symlink_to("busybox")
    cdir = Path(agent.S.LXC_PATH) / name
    (sdir / "config").write_text(
        f"lxc.rootfs.path = dir:{cdir}/rootfs\nlxc.uts.name = {name}\nlxc.hook.pre-start = /bin/evil\nlxc.tty.max = 4\n"
    )
    meta = {"snapshot": snap, "container": name, "stateful": stateful, "created_at": "2026-12-01T10:00:00.000+00:00"}
    if stateful:
        (sdir / "images").mkdir()
        (sdir / "images" / "inventory.img").write_bytes(b"inventory")
        (sdir / "images" / "pages-1.img").write_bytes(os.urandom(20000))
    (sdir / "meta.json").write_text(json.dumps(meta))
    return sdir


def _export(agent, name="c1", snap="s1"):
    buf = io.BytesIO()
    agent.write_export(buf, name, snap)
    return buf.getvalue()


def _verify(agent, data, max_bytes=1 << 30):
    return agent.exports.verify(io.BytesIO(data), max_bytes)


def _import(agent, monkeypatch, data, name="c2", into=False):
    r, w = os.pipe()

    def feed():
        try:
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BrokenPipeError:
            pass  # the import refused and stopped reading

    threading.Thread(target=feed, daemon=True).start()

    class Stdin:
        buffer = os.fdopen(r, "rb")

    monkeypatch.setattr(sys, "stdin", Stdin)
    try:
        return agent.cmd_import({"name": name, "stall_s": 5, "into": into})
    finally:
        Stdin.buffer.close()


def _leftovers(agent, name="c2"):
    """Anything of an import of `name` on the host: its container, its snapshots, staging directories."""
    found = []
    for base in (agent.S.LXC_PATH, agent.S.SNAPSHOTS_PATH):
        for n in os.listdir(base) if os.path.isdir(base) else []:
            if n == name or n.startswith(".ctweb-"):
                found.append(os.path.join(base, n))
    return found


def test_an_export_verifies_and_imports_as_a_new_stopped_container_with_its_snapshot(agent, monkeypatch):
    sdir = _snapshot(agent)
    data = _export(agent)
    man = _verify(agent, data)
    assert (man["container"], man["snapshot"], man["stateful"]) == ("c1", "s1", True)
    busybox = (sdir / "rootfs" / "bin" / "busybox").read_bytes()
    assert man["files"]["export/s1/rootfs/bin/busybox"] == {
        "size": len(busybox),
        "sha256": hashlib.sha256(busybox).hexdigest(),
    }
    out = _import(agent, monkeypatch, data)
    assert out["snapshot"] == "s1" and out["stateful"] is True
    cdir = Path(agent.S.LXC_PATH) / "c2"
    snap = Path(agent.S.SNAPSHOTS_PATH) / "c2" / "s1"
    assert (cdir / "rootfs" / "bin" / "busybox").read_bytes() == busybox
    assert os.readlink(cdir / "rootfs" / "bin" / "ls") == "busybox"
    # The container's rootfs is its own copy: no inode shared with the snapshot.
    assert os.stat(cdir / "rootfs" / "bin" / "busybox").st_ino != os.stat(snap / "rootfs" / "bin" / "busybox").st_ino
    assert (snap / "images" / "pages-1.img").read_bytes() == (sdir / "images" / "pages-1.img").read_bytes()
    for config in (cdir / "config", snap / "config"):
        text = config.read_text()
        assert f"lxc.rootfs.path = dir:{cdir}/rootfs" in text and "lxc.uts.name = c2" in text
        assert "lxc.hook" not in text and "lxc.tty.max = 4" in text
    assert out["config_dropped"] == ["lxc.hook.pre-start"]
    meta = json.loads((snap / "meta.json").read_text())
    assert meta["container"] == "c2" and meta["imported_from"]["container"] == "c1" and meta["stateful"] is True
    assert [p for p in _leftovers(agent) if ".ctweb-" in p] == []


def test_importing_over_an_existing_name_is_refused(agent, monkeypatch):
    _snapshot(agent)
    data = _export(agent)
    with pytest.raises(agent.AgentError, match="exists on this host already"):
        _import(agent, monkeypatch, data, name="c1")


def test_an_export_imports_into_an_existing_container_as_a_snapshot_of_it(agent, monkeypatch):
    _snapshot(agent)
    data = _export(agent)
    cdir = Path(agent.S.LXC_PATH) / "c3"
    (cdir / "rootfs").mkdir(parents=True)
    (cdir / "rootfs" / "mine").write_text("kept")
    (cdir / "config").write_text(f"lxc.rootfs.path = dir:{cdir}/rootfs\n")
    out = _import(agent, monkeypatch, data, name="c3", into=True)
    assert (out["snapshot"], out["into"]) == ("s1", True)
    snap = Path(agent.S.SNAPSHOTS_PATH) / "c3" / "s1"
    assert (snap / "rootfs" / "etc" / "hostname").read_text() == "c1\n"
    assert f"lxc.rootfs.path = dir:{cdir}/rootfs" in (snap / "config").read_text()
    assert (cdir / "rootfs" / "mine").read_text() == "kept"  # the container itself is untouched
    assert [p for p in _leftovers(agent, "c3") if ".ctweb-" in p] == []
    with pytest.raises(agent.AgentError, match="has a snapshot named s1 already"):
        _import(agent, monkeypatch, data, name="c3", into=True)
    assert [p for p in _leftovers(agent, "c3") if ".ctweb-" in p] == []
    with pytest.raises(agent.AgentError, match="no container c4"):
        _import(agent, monkeypatch, data, name="c4", into=True)


# --- hostile archives ---------------------------------------------------------------------------


def _members(data):
    """(TarInfo, content) of every member of an archive."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            out.append((m, tar.extractfile(m).read() if m.isreg() else None))
    return out


def _tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m, content in members:
            tar.addfile(m, io.BytesIO(content) if content is not None else None)
    return buf.getvalue()


def _with_manifest(members, change=None):
    """The members with a manifest that matches them (a forger's own), `change`d first."""
    files = {m.name: {"size": len(c), "sha256": hashlib.sha256(c).hexdigest()} for m, c in members if m.isreg()}
    links = {m.name: m.linkname for m, _ in members if m.islnk()}
    man = {
        "format": "ctweb-export", "version": 1, "container": "c1", "snapshot": "s1", "stateful": False,
        "created_at": "", "files": files, "links": links,
    }  # fmt: skip
    if change:
        change(man)
    data = json.dumps(man).encode()
    info = tarfile.TarInfo("ctweb-export.json")
    info.size = len(data)
    return members + [(info, data)]


def _base():
    out = []
    for name in ("export", "export/s1", "export/s1/rootfs"):
        info = tarfile.TarInfo(name)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        out.append((info, None))
    info = tarfile.TarInfo("export/s1/config")
    info.size = 14
    out.append((info, b"lxc.tty.max=4\n"))
    return out


def _member(name, kind=tarfile.REGTYPE, content=b"x", linkname="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    if kind == tarfile.REGTYPE:
        info.size = len(content)
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 8, 0
    return info, content if kind == tarfile.REGTYPE else None


HOSTILE = {
    "path traversal": lambda: _tar(_with_manifest(_base() + [_member("export/s1/../../../etc/cron.d/x")])),
    "absolute path": lambda: _tar(_with_manifest(_base() + [_member("/etc/cron.d/x")])),
    "another top directory": lambda: _tar(_with_manifest(_base() + [_member("c2/rootfs/x")])),
    "symlink outside the rootfs": lambda: _tar(
        _with_manifest(_base() + [_member("export/s1/images", tarfile.SYMTYPE, linkname="/etc")])
    ),
    "a file written through a rootfs symlink": lambda: _tar(
        _with_manifest(
            _base()
            + [
                _member("export/s1/rootfs/etc", tarfile.SYMTYPE, linkname="/etc"),
                _member("export/s1/rootfs/etc/cron.d/x", content=b"* * * * * root id"),
            ]
        )
    ),
    "device node outside the rootfs": lambda: _tar(
        _with_manifest(_base() + [_member("export/s1/sda", tarfile.BLKTYPE)])
    ),
    "setuid file outside the rootfs": lambda: _tar(_with_manifest(_base() + [_member("export/s1/su", mode=0o4755)])),
    "hard link to a host file": lambda: _tar(
        _with_manifest(_base() + [_member("export/s1/rootfs/shadow", tarfile.LNKTYPE, linkname="/etc/shadow")])
    ),
    "a member twice": lambda: _tar(_with_manifest(_base() + [_member("export/s1/config", content=b"lxc.tty.max=9\n")])),
    "two snapshots": lambda: _tar(_with_manifest(_base() + [_member("export/s2/x")])),
    "checksum mismatch": lambda: _tar(
        _with_manifest(
            _base(), lambda man: man["files"]["export/s1/config"].update(sha256=hashlib.sha256(b"other").hexdigest())
        )
    ),
    "a file the manifest does not name": lambda: _tar(
        _with_manifest(_base(), lambda man: man["files"].pop("export/s1/config"))
    ),
    "members after the manifest": lambda: _tar(_with_manifest(_base()) + [_member("export/s1/rootfs/late")]),
    "no manifest": lambda: _tar(_base()),
    "oversized manifest": lambda: _tar(_base() + [_oversized_manifest()]),
    "manifest of another format": lambda: _tar(_with_manifest(_base(), lambda man: man.update(format="tar"))),
    "manifest with a bad name": lambda: _tar(_with_manifest(_base(), lambda man: man.update(container="../x"))),
    "stateful without images": lambda: _tar(_with_manifest(_base(), lambda man: man.update(stateful=True))),
    "not a tar": lambda: b"PK\x03\x04 a zip, say" + b"\0" * 2000,
}


def _oversized_manifest():
    info = tarfile.TarInfo("ctweb-export.json")
    info.size = (64 << 20) + 1
    return info, b" " * info.size


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_archive_is_refused_by_the_dashboards_check_and_by_the_import(agent, monkeypatch, tmp_path, case):
    data = HOSTILE[case]()
    with pytest.raises(agent.AgentError) as refused:
        _verify(agent, data)
    assert refused.value.message.endswith((".", ")", "'", "?")), refused.value.message
    with pytest.raises(agent.AgentError):
        _import(agent, monkeypatch, data)
    assert _leftovers(agent) == []
    # Into an existing container: refused the same way, and nothing of it added.
    cdir = Path(agent.S.LXC_PATH) / "c3"
    (cdir / "rootfs").mkdir(parents=True)
    (cdir / "config").write_text(f"lxc.rootfs.path = dir:{cdir}/rootfs\n")
    with pytest.raises(agent.AgentError):
        _import(agent, monkeypatch, data, name="c3", into=True)
    assert _leftovers(agent, "c3") == [str(cdir)]
    assert not (Path("/etc/cron.d") / "x").exists()


def test_a_truncated_export_is_refused_wherever_it_was_cut(agent, monkeypatch):
    _snapshot(agent)
    data = _export(agent)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        manifest = tar.getmember("ctweb-export.json")
    # Anywhere up to the manifest's last byte (what follows it is the tar's zero padding).
    for cut in (100, 512, 1024, len(data) // 2, manifest.offset, manifest.offset_data + manifest.size - 1):
        with pytest.raises(agent.AgentError):
            _verify(agent, data[:cut])
    with pytest.raises(agent.AgentError):
        _import(agent, monkeypatch, data[: len(data) // 2])
    assert _leftovers(agent) == []


def test_a_flipped_byte_in_any_file_is_found(agent, monkeypatch):
    _snapshot(agent)
    data = bytearray(_export(agent))
    members = _members(bytes(data))
    # Flip one byte of the memory pages' content, where it sits in the tar.
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        pages = tar.getmember("export/s1/images/pages-1.img")
    data[pages.offset_data + 100] ^= 0xFF
    with pytest.raises(agent.AgentError, match="does not match its checksum"):
        _verify(agent, bytes(data))
    with pytest.raises(agent.AgentError, match="does not match its checksum"):
        _import(agent, monkeypatch, bytes(data))
    assert _leftovers(agent) == [] and len(members) > 5


def test_an_archive_past_the_size_limit_is_refused(agent):
    _snapshot(agent)
    data = _export(agent)
    with pytest.raises(agent.AgentError, match="larger than"):
        _verify(agent, data, max_bytes=len(data) // 2)


def test_a_killed_imports_staging_is_removed_when_its_recovery_asks_the_host(agent, monkeypatch):
    # What an import SIGKILLed while staging leaves: its .ctweb-import-<name>-... directories.
    stages = [
        Path(agent.S.LXC_PATH) / ".ctweb-import-c2-4242-0a0b0c0d",
        Path(agent.S.SNAPSHOTS_PATH) / ".ctweb-import-c2-4242-0a0b0c0d",
    ]
    for d in stages:
        (d / "rootfs").mkdir(parents=True)
    other = Path(agent.S.LXC_PATH) / ".ctweb-import-c22-1-00000000"  # another name's: not this one's
    other.mkdir()
    monkeypatch.setattr(agent.commands, "_exists", lambda name: False)
    out = agent.cmd_inspect({"name": "c2", "snapshot": "s1"})  # the import's recovery asks this
    assert out["removed_import_staging"] is True and out["exists"] is False
    assert not any(d.exists() for d in stages) and other.exists()
    assert "removed_import_staging" not in agent.cmd_inspect({"name": "c2"})
