"""A non-root SSH user with sudo (docs/HOSTS.md): the commands such a host runs, the shipped
sudoers rules, the sentences for a sudo that refuses, and the agent installer
(hosts/agent/install_agent.py) against what a hostile SSH user could hand it. The installer runs
here for real as root, with its directories moved into a temporary one, and verifies signatures
with the real `ssh-keygen -Y verify`; the lab test (tests/hosts/test_e2e_lab_sudo.py) runs it
through sudo on a lab host."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import paramiko
import pytest

from hosts import sudo
from hosts.agent import agent_file_name, agent_source, install_agent

ROOT = Path(__file__).resolve().parents[2]
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the installer checks root's ownership: run as root")


def host(username="ctweb", name="h1"):
    return SimpleNamespace(name=name, username=username)


def test_a_root_host_runs_the_agent_as_it_always_did_and_another_user_through_sudo():
    path = f"/var/lib/ctweb/agent/{agent_file_name()}"
    assert sudo.agent_command(host("root"), path, "probe") == f"python3 {path} probe"
    assert sudo.agent_command(host("ctweb"), path, "probe") == f"sudo -n /usr/bin/python3 {path} probe"
    assert (
        sudo.installer_command(agent_file_name()) == f"sudo -n /usr/local/sbin/ctweb-install-agent {agent_file_name()}"
    )
    with pytest.raises(ValueError):
        sudo.installer_command("../ctweb-agent-0123456789abcdef.pyz")


def test_the_shipped_sudoers_file_allows_the_agent_and_its_installer_only():
    shipped = (ROOT / "deploy" / "sudoers.d" / "ctweb").read_text()
    assert shipped == sudo.sudoers("ctweb")
    rules = [ln for ln in shipped.splitlines() if ln and not ln.startswith(("#", "Defaults"))]
    hexes = "[0-9a-f]" * 16
    assert rules == [
        f"ctweb ALL=(root) NOPASSWD: /usr/bin/python3 /var/lib/ctweb/agent/ctweb-agent-{hexes}.pyz *",
        f"ctweb ALL=(root) NOPASSWD: /usr/local/sbin/ctweb-install-agent ctweb-agent-{hexes}.pyz",
    ]
    # The installer's name pattern and the sudoers glob agree on what an agent's name is.
    assert install_agent.NAME_RE.fullmatch(agent_file_name())
    for bad in ("root", "Ctweb", "a b", "x;y", ""):
        with pytest.raises(ValueError):
            sudo.sudoers(bad)


VISUDO = shutil.which("visudo", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


@pytest.mark.skipif(VISUDO is None, reason="needs visudo (the sudo package: scripts/setup.sh installs it)")
def test_the_shipped_sudoers_file_is_one_sudo_accepts(tmp_path):
    """What an admin installs in /etc/sudoers.d is parsed by sudo's own checker (a file sudo
    cannot parse makes sudo refuse everything, the host's admin included)."""
    shipped = ROOT / "deploy" / "sudoers.d" / "ctweb"
    checked = subprocess.run([VISUDO, "-c", "-f", str(shipped)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The check can fail: the same rules with one colon gone are refused.
    broken = tmp_path / "ctweb"
    broken.write_text(shipped.read_text().replace("NOPASSWD:", "NOPASSWD", 1))
    refused = subprocess.run([VISUDO, "-c", "-f", str(broken)], capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "syntax error" in refused.stdout + refused.stderr


@pytest.mark.parametrize(
    "stderr, status, words",
    [
        ("bash: line 1: sudo: command not found\n", 127, "h1 has no sudo, which its SSH user ctweb (not root) needs"),
        ("sh: 1: sudo: not found\n", 127, "h1 has no sudo"),
        ("sudo: a password is required\n", 1, "sudo refused ctweb's agent on h1 for the SSH user ctweb"),
        (
            "Sorry, user ctweb is not allowed to execute '/usr/bin/python3 /var/lib/ctweb/agent/x.pyz probe' as root on h1.\n",
            1,
            "add the rules of docs/HOSTS.md",
        ),
        ("sudo: /usr/local/sbin/ctweb-install-agent: command not found\n", 1, "The agent installer"),
    ],
)
def test_a_sudo_that_refuses_is_one_sentence_that_says_what_to_put_in_place(stderr, status, words):
    said = sudo.refusal(host(), stderr, status)
    assert said is not None and words in said, said
    assert "manage.py host sudo-setup h1" in said and said.endswith(".") and "\n" not in said


def test_what_is_not_sudo_is_no_sudo_refusal():
    assert sudo.refusal(host(), "Traceback (most recent call last):\n  ...\nKeyError: 'x'\n", 1) is None
    assert sudo.refusal(host("root"), "sudo: a password is required\n", 1) is None


def test_the_setup_script_puts_the_installer_the_signing_key_and_the_checked_rules_in_place(tmp_path):
    key = _keypair(tmp_path, "fleet")
    line = f"{key.get_name()} {key.get_base64()} ctweb-dashboard"
    script = sudo.setup_script("ctweb", line)
    assert install_agent.__doc__.splitlines()[0] in script  # the installer, whole
    assert f'ctweb-dashboard namespaces="ctweb-agent" ssh-ed25519 {key.get_base64()}' in script
    assert sudo.sudoers("ctweb") in script
    assert script.index("visudo -c") < script.index(
        f'install -o root -g root -m 0440 "$tmp/sudoers" {sudo.SUDOERS_FILE}'
    )
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0


# --- the installer ------------------------------------------------------------------------


def _keypair(tmp_path: Path, name: str) -> paramiko.Ed25519Key:
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return paramiko.Ed25519Key.from_private_key_file(str(path))


@pytest.fixture
def box(tmp_path, monkeypatch):
    """The installer's places below tmp_path, and the fleet's key trusted there."""
    fleet = _keypair(tmp_path, "fleet")
    etc = tmp_path / "etc"
    etc.mkdir()
    signers = etc / "agent-signers"
    signers.write_text(sudo.signers_line(f"{fleet.get_name()} {fleet.get_base64()}"))
    ctweb = tmp_path / "var-lib-ctweb"
    monkeypatch.setattr(install_agent, "CTWEB_DIR", str(ctweb))
    monkeypatch.setattr(install_agent, "AGENT_DIR", str(ctweb / "agent"))
    monkeypatch.setattr(install_agent, "SIGNERS", str(signers))
    return SimpleNamespace(tmp=tmp_path, fleet=fleet, signers=signers, ctweb=ctweb, agent=ctweb / "agent")


def _stdin(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / f"stdin-{hashlib.sha256(data).hexdigest()[:8]}"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def _run(box, name: str, data: bytes | None, signature: str | None = None, size: int | None = None):
    """install(name) with `data` (signed by the fleet's key unless `signature` is given) on its
    standard input: (its outcome or the Refused sentence, what it printed, what it read)."""
    if data is None:
        payload = b""
    else:
        header = {"size": len(data) if size is None else size, "signature": signature or sudo.sign(data, box.fleet)}
        payload = json.dumps(header).encode() + b"\n" + data
    fd = _stdin(box.tmp, payload)
    out = io.StringIO()
    try:
        try:
            outcome = install_agent.install(name, stdin=fd, out=out)
        except install_agent.Refused as e:
            outcome = f"refused: {e}"
        read = os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)
    return outcome, out.getvalue(), read


def _listing(box) -> list[str]:
    return sorted(os.listdir(box.agent)) if box.agent.is_dir() else []


@as_root
def test_the_dashboards_signed_agent_is_installed_root_only_and_then_found(box):
    data, digest = agent_source()
    name = agent_file_name()
    outcome, said, _ = _run(box, name, data)
    assert (outcome, said) == ("installed", f"send\ninstalled {name}\n")
    st = os.stat(box.agent / name)
    assert (st.st_uid, oct(st.st_mode & 0o7777)) == (0, "0o600")
    assert oct(os.stat(box.agent).st_mode & 0o777) == "0o700"
    assert hashlib.sha256((box.agent / name).read_bytes()).hexdigest() == digest
    assert _listing(box) == [name]  # no temporary file left
    outcome, said, read = _run(box, name, data)
    assert (outcome, said, read) == ("have", "have\n", 0)  # installed already: nothing read


@as_root
@pytest.mark.parametrize(
    "name",
    [
        "../ctweb-agent-0123456789abcdef.pyz",
        "/tmp/ctweb-agent-0123456789abcdef.pyz",
        "ctweb-agent-0123456789abcdef.pyz/../../x",
        "ctweb-agent-0123456789ABCDEF.pyz",
        "ctweb-agent-0123456789abcde.pyz",
        "ctweb-agent-0123456789abcdef0.pyz",
        "ctweb-agent-0123456789abcdef.pyz\n",
        "ctweb-agent-0123456789abcdef.py",
        "",
    ],
)
def test_a_name_that_is_not_an_agents_is_refused_before_anything_is_made(box, name):
    outcome, said, read = _run(box, name, agent_source()[0])
    assert outcome.startswith("refused: ") and "is not an agent's name" in outcome
    assert (said, read) == ("", 0)
    assert not box.ctweb.exists()


def _own_agent(text: bytes = b"import os\nos.system('id > /tmp/pwned')\n") -> tuple[str, bytes]:
    """What a hostile SSH user would install: a file of their own, named by its own hash."""
    return f"ctweb-agent-{hashlib.sha256(text).hexdigest()[:16]}.pyz", text


@as_root
def test_an_agent_of_the_ssh_users_own_is_refused_however_it_is_signed(box):
    name, data = _own_agent()
    unsigned = "-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n"
    for signature in (unsigned, sudo.sign(data, _keypair(box.tmp, "other")), sudo.sign(b"another file", box.fleet)):
        outcome, said, _ = _run(box, name, data, signature=signature)
        assert outcome.startswith("refused: The agent's signature does not verify against the dashboard's key"), outcome
        assert said == "send\n"
        assert _listing(box) == []
    outcome, _, _ = _run(box, name, data, signature="not a signature")
    assert outcome == "refused: The agent comes without an SSH signature."
    assert _listing(box) == []


@as_root
def test_bytes_that_do_not_match_their_name_are_refused_even_when_signed(box):
    _, data = _own_agent()
    outcome, _, _ = _run(box, agent_file_name(), data)  # the fleet's signature on the wrong bytes
    assert outcome.startswith("refused: The agent's bytes hash to "), outcome
    assert _listing(box) == []


@as_root
def test_a_cut_stream_or_a_size_past_the_limit_leaves_nothing(box):
    data = agent_source()[0]
    outcome, _, _ = _run(box, agent_file_name(), data[:1000], size=len(data))
    assert outcome == f"refused: The agent's bytes ended after 1000 of {len(data)}."
    outcome, _, read = _run(box, agent_file_name(), b"x", size=install_agent.MAX_SIZE + 1)
    assert outcome.startswith("refused: The agent's size must be")
    outcome, _, _ = _run(box, agent_file_name(), None)
    assert outcome == "refused: The agent's header line is not JSON."
    assert _listing(box) == []


@as_root
def test_a_symlinked_or_shared_agent_directory_is_never_written_through(box):
    elsewhere = box.tmp / "users-dir"
    elsewhere.mkdir(mode=0o777)
    box.ctweb.mkdir(mode=0o700)
    box.agent.symlink_to(elsewhere)
    outcome, _, _ = _run(box, agent_file_name(), agent_source()[0])
    assert outcome.startswith(f"refused: {box.agent} is not a directory ctweb can use"), outcome
    assert os.listdir(elsewhere) == []
    box.agent.unlink()
    box.agent.mkdir()
    os.chmod(box.agent, 0o777)  # mkdir's mode goes through the umask
    outcome, _, _ = _run(box, agent_file_name(), agent_source()[0])
    assert outcome == f"refused: {box.agent} must be root's and writable by root only."
    assert _listing(box) == []


@as_root
def test_a_file_planted_under_the_agents_name_is_replaced_not_followed(box):
    box.agent.mkdir(parents=True, mode=0o700)
    target = box.tmp / "victim"
    target.write_text("keep me")
    name = agent_file_name()
    (box.agent / name).symlink_to(target)
    outcome, said, _ = _run(box, name, agent_source()[0])
    assert (outcome, said.splitlines()[0]) == ("installed", "send")
    assert target.read_text() == "keep me" and not (box.agent / name).is_symlink()
    (box.agent / name).write_bytes(b"a cut copy")  # root's, but not what its name says
    outcome, _, _ = _run(box, name, agent_source()[0])
    assert outcome == "installed"
    assert hashlib.sha256((box.agent / name).read_bytes()).hexdigest() == agent_source()[1]


@as_root
def test_a_signing_key_others_may_change_is_not_trusted(box):
    os.chmod(box.signers, 0o666)
    outcome, _, _ = _run(box, agent_file_name(), agent_source()[0])
    assert outcome.startswith("refused: ") and "must be a regular file of root's, writable by root only" in outcome
    box.signers.unlink()
    outcome, _, _ = _run(box, agent_file_name(), agent_source()[0])
    assert outcome.startswith("refused: ") and "is missing: run the root setup of docs/HOSTS.md" in outcome
    assert _listing(box) == []


def test_the_installer_refuses_to_run_as_anyone_but_root_and_takes_one_argument():
    script = Path(install_agent.__file__).read_text()
    p = subprocess.run(["/usr/bin/python3", "-"], input=script, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("usage: ctweb-install-agent")
    if os.geteuid() == 0:
        p = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-", agent_file_name()],
            input=script,
            capture_output=True,
            text=True,
            cwd="/",
        )
        assert p.returncode == 2 and "runs as root" in p.stderr, p.stderr
