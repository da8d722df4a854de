"""The agent's debug bundle filter, on a real tree: keys planted where a bundle looks (a
container's logs and config, a snapshot's and the state's logs, by name and through symlinks)
never reach the bundle's contents, while the logs around them do. The agent runs as it does
on a host, only its paths point into a temporary directory and the host commands it would
run (uname, criu, dmesg, lxc-info) are replaced by a fixed answer."""

import os
import subprocess

import pytest

from tests.support.bundle_secrets import leaks, members, secret_fragments


@pytest.fixture
def planted(agent, tmp_path, monkeypatch):  # noqa: F811
    key = tmp_path / "keys" / "id_ed25519"
    key.parent.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    fragments = secret_fragments(
        key.read_text(), "django-insecure-planted-secret-key-0123456789", {"bob": "tok3n-of-bob"}
    )
    secret_text = key.read_text() + "SECRET_KEY=django-insecure-planted-secret-key-0123456789\ntok3n-of-bob\n"
    (tmp_path / "keys" / "server.pem").write_text(secret_text)
    (tmp_path / "keys" / "notes.txt").write_text(secret_text)  # secrets under a harmless name

    ctweb, lxc = tmp_path / "ctweb", tmp_path / "lxc"
    monkeypatch.setattr(agent.S, "BUNDLES_PATH", str(ctweb / "bundles"))
    monkeypatch.setattr(agent.bundle, "run", lambda argv, **kw: (0, f"ran {argv[0]}\n", ""))
    monkeypatch.setattr(agent.common, "emit", lambda msg: None)
    box = lxc / "box"
    (box / "rootfs" / "root" / ".ssh").mkdir(parents=True)
    (box / "rootfs" / "root" / ".ssh" / "id_ed25519").write_text(secret_text)  # the container's own files
    (box / "rootfs" / "dump.log").write_text(secret_text)  # a log name, but inside the rootfs
    (box / "config").write_text("lxc.uts.name = box\n")
    (box / "lxc.log").write_text("lxc said: fine\n")
    os.symlink(key, box / "console.log")  # a log that is a link to a key
    snap = ctweb / "snapshots" / "box" / "snap1"
    (snap / "rootfs").mkdir(parents=True)
    (snap / "rootfs" / "restore.log").write_text(secret_text)
    (snap / "dump.log").write_text("criu dump: ok\n")
    (snap / "meta.json").write_text('{"name": "snap1"}')
    os.symlink(tmp_path / "keys" / "server.pem", snap / "restore.log")
    (snap / "id_ed25519.log").write_text(secret_text)  # a key file's name, whatever its suffix
    (snap / "host.key.log").write_text("not a .key: kept\n")
    state = ctweb / "state" / "box"
    state.mkdir(parents=True)
    (state / "restore.log").write_text("criu restore: ok\n")
    os.symlink(tmp_path / "keys" / "notes.txt", state / "stats-dump")
    return fragments


def test_a_bundle_holds_the_logs_and_no_planted_key(agent, planted):  # noqa: F811
    out = agent.cmd_bundle({"op": 7, "name": "box"})
    data = open(out["path"], "rb").read()
    names = {n for n, _ in members(data)}
    for expected in (
        "op-7/container/config", "op-7/container/lxc.log", "op-7/ctweb/snapshots/box/snap1/dump.log",
        "op-7/ctweb/snapshots/box/snap1/meta.json", "op-7/ctweb/state/box/restore.log", "op-7/host/uname.txt",
    ):  # fmt: skip
        assert expected in names, (expected, sorted(names))
    assert leaks(data, planted) == []


def test_the_search_finds_a_key_in_a_bundle(agent, planted, tmp_path):  # noqa: F811
    """The search itself: a bundle (tar.gz in a tar.gz, as the dashboard serves it) with the key
    inside a member is caught, whatever the member's name."""
    import io
    import tarfile

    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        data = (tmp_path / "keys" / "id_ed25519").read_bytes()
        info = tarfile.TarInfo("op-7/host/innocent.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    outer = io.BytesIO()
    with tarfile.open(fileobj=outer, mode="w:gz") as tar:
        info = tarfile.TarInfo("op-7/lab-b.tar.gz")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    found = leaks(outer.getvalue(), planted)
    assert any(member.endswith("!op-7/host/innocent.txt") for _, member in found), found


def test_a_bundle_holds_what_explains_a_criu_failure(agent, planted, monkeypatch):  # noqa: F811
    """`criu check --all`, the netfilter state (CRIU locks the network with it) and the versions
    of what checkpoints depend on, each from the command that reports it."""
    ran = []

    def fake_run(argv, **kw):
        ran.append(argv)
        return (0, f"{' '.join(argv)} says hello\n", "")

    monkeypatch.setattr(agent.bundle, "run", fake_run)
    out = agent.cmd_bundle({"op": 8, "name": "box"})
    texts = {n: m for n, m in members(open(out["path"], "rb").read())}
    assert ["criu", "check", "--all"] in ran and ["iptables-save"] in ran and ["nft", "list", "ruleset"] in ran
    for name in ("criu-check-all", "netfilter-iptables", "netfilter-ip6tables", "netfilter-nft", "versions"):
        assert f"op-8/host/{name}.txt" in texts, sorted(texts)
    versions = texts["op-8/host/versions.txt"].decode()
    assert "criu: criu --version says hello" in versions and "lxc: lxc-start --version says hello" in versions
    assert versions.startswith("kernel: ") and "\nagent: " in versions
