"""The agent's migration tars never read or write outside the container (real files, temp dirs)."""

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support.agent import make_tar, receive  # noqa: F401


def test_sending_never_follows_a_symlink_out_of_the_tree(agent, tmp_path):
    secret = tmp_path / "host-secret"
    secret.write_text("host only")
    src = tmp_path / "src"
    (src / "rootfs").mkdir(parents=True)
    (src / "rootfs" / "ok").write_text("mine")
    (src / "rootfs" / "evil").symlink_to(tmp_path)  # a directory swapped for a link to the host
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        agent._tar_tree(tar, str(src), "c1")
    names = tarfile.open(fileobj=io.BytesIO(buf.getvalue())).getnames()
    assert "c1/rootfs/ok" in names and "c1/rootfs/evil" in names
    assert not any("host-secret" in n for n in names)
    assert b"host only" not in buf.getvalue()


def test_receiving_refuses_to_write_through_a_symlink(agent, monkeypatch, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = make_tar(
        [
            ("c1", "dir", None),
            ("c1/rootfs", "dir", None),
            ("c1/rootfs/x", "symlink", str(outside)),
            ("c1/rootfs/x/pwned", "file", b"root on the target"),
        ]
    )
    with pytest.raises(agent.AgentError):
        receive(agent, monkeypatch, evil)
    assert not (outside / "pwned").exists()


def test_a_directory_swapped_for_a_symlink_mid_tar_is_not_written_through(agent, monkeypatch, tmp_path):
    """The receiver keeps the last member's directories open (images._DirChain): a later member
    that replaces one of them with a link to the host, then writes beneath it, still meets the
    link, not the directory it held open."""
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = make_tar(
        [
            ("c1", "dir", None),
            ("c1/rootfs", "dir", None),
            ("c1/rootfs/x", "dir", None),
            ("c1/rootfs/x/a", "file", b"first"),
            ("c1/rootfs/x", "symlink", str(outside)),
            ("c1/rootfs/x/pwned", "file", b"root on the target"),
        ]
    )
    with pytest.raises(agent.AgentError):
        receive(agent, monkeypatch, evil)
    assert list(outside.iterdir()) == []


def test_receiving_refuses_members_of_other_containers_or_absolute_paths(agent, monkeypatch):
    for member in ("c2/rootfs/x", "/etc/x", "c1/../c2/x"):
        with pytest.raises(agent.AgentError):
            receive(agent, monkeypatch, make_tar([(member, "file", b"x")]))


def test_a_delta_never_deletes_through_a_symlink(agent, monkeypatch, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep me")
    root = Path(agent.S.LXC_PATH) / "c1" / "rootfs"
    root.mkdir(parents=True)
    (root / "gone").write_text("old")
    (root / "d").symlink_to(outside)
    (root.parent / "config").write_text(f"lxc.rootfs.path = dir:{root}\n")
    delta = json.dumps({"deleted": ["d/victim", "gone", "../../x"]}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(agent.DELTA_MEMBER)
        info.size = len(delta)
        tar.addfile(info, io.BytesIO(delta))
        info = tarfile.TarInfo("c1/config")
        cfg = f"lxc.rootfs.path = dir:{root}\nlxc.hook.pre-start = /bin/evil\n".encode()
        info.size = len(cfg)
        tar.addfile(info, io.BytesIO(cfg))
    receive(agent, monkeypatch, buf.getvalue(), what="delta")
    assert (outside / "victim").read_text() == "keep me"
    assert not (root / "gone").exists()
    config = (root.parent / "config").read_text()
    assert "lxc.hook" not in config  # a config from another host runs no hooks here


def test_the_rootfs_must_be_the_containers_own(agent):
    cdir = Path(agent.S.LXC_PATH) / "c1"
    (cdir / "rootfs").mkdir(parents=True)
    (cdir / "config").write_text("lxc.rootfs.path = dir:/usr\n")
    with pytest.raises(agent.AgentError):
        agent._rootfs("c1")
    (cdir / "config").write_text(f"lxc.rootfs.path = dir:{cdir}/rootfs\n")
    assert agent._rootfs("c1") == f"{cdir}/rootfs"
    assert os.path.isdir(agent._rootfs("c1"))


def test_a_receive_whose_sender_goes_silent_gives_up(agent, monkeypatch):
    # The sender's link died: nothing more arrives, and nothing says the stream ended.
    r, w = os.pipe()
    os.write(w, make_tar([("c1", "dir", None), ("c1/big", "file", b"x" * 100000)])[:5000])  # then silence

    class Stdin:
        buffer = os.fdopen(r, "rb")

    monkeypatch.setattr(sys, "stdin", Stdin)
    try:
        with pytest.raises(agent.AgentError, match="Nothing arrived for 1 s"):
            agent.cmd_receive({"name": "c1", "migration": 1, "what": "rootfs", "stall_s": 1})
    finally:
        os.close(w)
        Stdin.buffer.close()


# --- the confirmed attacks of issue 12 (a compromised source host crafts the tar) ----------


def test_a_top_level_symlink_is_never_written_through(agent, monkeypatch, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = make_tar([("c1", "symlink", str(outside)), ("c1/pwned", "file", b"root on the target")])
    with pytest.raises(Exception):  # noqa: B017 (refused; before the fix, a crash after the write)
        receive(agent, monkeypatch, evil)
    assert list(outside.iterdir()) == []
    assert not os.path.lexists(Path(agent.S.LXC_PATH) / "c1")  # nothing half-placed


def test_a_rootfs_symlink_cannot_lead_a_deltas_deletions_to_the_host(agent, monkeypatch, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep me")
    cdir = Path(agent.S.LXC_PATH) / "c1"
    first = make_tar(
        [
            ("c1", "dir", None),
            ("c1/config", "file", f"lxc.rootfs.path = dir:{cdir}/rootfs\n".encode()),
            ("c1/rootfs", "symlink", str(outside)),
        ]
    )
    try:
        receive(agent, monkeypatch, first)
    except agent.AgentError:
        pass  # refused: what matters is that the delta below cannot reach the host
    assert not os.path.islink(cdir / "rootfs")
    delta = json.dumps({"deleted": ["victim"]}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(agent.DELTA_MEMBER)
        info.size = len(delta)
        tar.addfile(info, io.BytesIO(delta))
    try:
        receive(agent, monkeypatch, buf.getvalue(), what="delta")
    except (agent.AgentError, OSError):
        pass
    assert (outside / "victim").read_text() == "keep me"


def test_a_config_tmp_symlink_never_receives_the_agents_config_rewrite(agent, monkeypatch, tmp_path):
    cron = tmp_path / "cron.d"
    cron.mkdir()
    cdir = Path(agent.S.LXC_PATH) / "c1"
    evil = make_tar(
        [
            ("c1", "dir", None),
            ("c1/rootfs", "dir", None),
            ("c1/config", "file", b"* * * * * root /tmp/evil\n"),
            ("c1/config.tmp", "symlink", str(cron / "evil")),
        ]
    )
    try:
        receive(agent, monkeypatch, evil)
    except agent.AgentError:
        pass
    assert list(cron.iterdir()) == []
    assert not os.path.islink(cdir / "config") and not os.path.islink(cdir / "config.tmp")


def _special_tar(extra):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind in [("c1", tarfile.DIRTYPE), ("c1/rootfs", tarfile.DIRTYPE)]:
            info = tarfile.TarInfo(name)
            info.type = kind
            tar.addfile(info)
        info = tarfile.TarInfo("c1/config")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"x=1\n"))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name, type_=tarfile.REGTYPE, mode=0o644, linkname="", size=0):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.size = type_, mode, linkname, size
    if type_ == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    return info


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_devices_and_setuid_files_only_inside_a_rootfs(agent, monkeypatch):
    cdir = Path(agent.S.LXC_PATH) / "c1"
    for bad in (
        _info("c1/null", tarfile.CHRTYPE),
        _info("c1/su", mode=0o4755),
        _info("c1/sg", mode=0o2755),
        _info("c1/link", tarfile.SYMTYPE, linkname="rootfs"),
    ):
        with pytest.raises(agent.AgentError, match=bad.name):  # the error names the member
            receive(agent, monkeypatch, _special_tar([(bad, b"" if bad.isreg() else None)]))
        assert not os.path.lexists(cdir)
    ok = [
        (_info("c1/rootfs/null", tarfile.CHRTYPE, mode=0o666), None),
        (_info("c1/rootfs/su", mode=0o4755, size=2), b"#!"),
    ]
    receive(agent, monkeypatch, _special_tar(ok))
    assert os.stat(cdir / "rootfs/null").st_rdev == os.makedev(1, 3)
    assert os.stat(cdir / "rootfs/su").st_mode & 0o7777 == 0o4755


def test_hard_links_only_to_files_this_archive_brought(agent, monkeypatch, tmp_path):
    cdir = Path(agent.S.LXC_PATH) / "c1"
    for target in ("c1/rootfs/absent", "c2/config", "/etc/passwd", "c1/../c2/config", "c1/rootfs"):
        bad = _info("c1/rootfs/l", tarfile.LNKTYPE, linkname=target)
        with pytest.raises(agent.AgentError):
            receive(agent, monkeypatch, _special_tar([(bad, None)]))
        assert not os.path.lexists(cdir)
    good = [(_info("c1/rootfs/a", size=1), b"a"), (_info("c1/rootfs/b", tarfile.LNKTYPE, linkname="c1/rootfs/a"), None)]
    receive(agent, monkeypatch, _special_tar(good))
    assert os.stat(cdir / "rootfs/a").st_ino == os.stat(cdir / "rootfs/b").st_ino


def test_an_abort_removes_what_a_killed_receive_left_staged(agent):
    left = Path(agent.S.LXC_PATH) / ".ctweb-recv-1-rootfs-123-abcd" / "c1" / "rootfs"
    left.mkdir(parents=True)
    other = Path(agent.S.LXC_PATH) / ".ctweb-recv-2-rootfs-9-ffff"  # another migration's: kept
    other.mkdir()
    out = agent.cmd_migrate_abort({"name": "c1", "migration": 1})
    assert "staging" in out["removed"]
    assert not left.parent.parent.exists() and other.exists()
