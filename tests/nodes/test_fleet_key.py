"""The fleet's SSH key: made once before any host exists, never made again by a node that lacks
it (which refuses to start instead, in one sentence), and made whole even when several
processes make it at once."""

import multiprocessing
import os
import subprocess
import sys

import paramiko
import pytest
from django.core.management import CommandError, call_command

from hosts import ssh
from hosts.handlers import failure
from hosts.models import Host
from tests.support.stack import ROOT


def _host(name="h1", status=Host.Status.ONLINE):
    return Host.objects.create(name=name, address="127.0.0.9", port=22, status=status, key_type="ssh-ed25519")


def test_the_key_is_made_once_with_mode_0600_and_its_public_half(tmp_path):
    path = tmp_path / "ssh" / "id_ed25519"
    assert ssh.create_keypair(path) is True
    first = path.read_bytes()
    assert ssh.create_keypair(path) is False
    assert path.read_bytes() == first
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    line = ssh.public_key_line(path)
    assert line.startswith("ssh-ed25519 ") and line.endswith(" ctweb-dashboard")
    assert path.with_name("id_ed25519.pub").read_text().strip() == line
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


def _make(path, barrier):
    barrier.wait()
    ssh.create_keypair(path)


def test_processes_making_the_key_at_once_leave_one_whole_key(tmp_path):
    path = tmp_path / "ssh" / "id_ed25519"
    path.parent.mkdir(mode=0o700)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=_make, args=(path, barrier)) for _ in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    key = paramiko.Ed25519Key.from_private_key_file(str(path))  # one whole key
    assert path.with_name("id_ed25519.pub").read_text().split()[1] == key.get_base64()
    assert sorted(p.name for p in path.parent.iterdir()) == ["id_ed25519", "id_ed25519.pub"]


@pytest.mark.django_db
def test_the_command_makes_the_key_while_no_host_exists(settings, tmp_path, capsys):
    settings.SSH_KEY_PATH = tmp_path / "k" / "id_ed25519"
    call_command("sshkey")
    assert capsys.readouterr().out.strip() == ssh.public_key_line()
    assert settings.SSH_KEY_PATH.exists()


@pytest.mark.django_db
def test_once_hosts_exist_no_new_key_is_made(settings, tmp_path):
    settings.SSH_KEY_PATH = tmp_path / "k" / "id_ed25519"
    _host()
    with pytest.raises(CommandError, match="hosts exist, so no new key is made"):
        call_command("sshkey")
    with pytest.raises(SystemExit) as e:
        ssh.check_key_at_start()
    assert "is missing: this node cannot reach the fleet's hosts" in str(e.value)
    assert "\n" not in str(e.value)
    assert not settings.SSH_KEY_PATH.exists() and not settings.SSH_KEY_PATH.parent.exists()


@pytest.mark.django_db
def test_a_first_start_without_hosts_makes_the_key(settings, tmp_path):
    settings.SSH_KEY_PATH = tmp_path / "k" / "id_ed25519"
    ssh.check_key_at_start()
    assert ssh.key_problem() is None


@pytest.mark.django_db
def test_a_node_without_the_key_does_not_mark_the_host_offline(settings, tmp_path):
    settings.SSH_KEY_PATH = tmp_path / "absent"
    host = _host()
    host.key_data = "AAAA"
    with pytest.raises(ssh.KeyMissing) as e, ssh.connect(host):
        pass
    failure(e.value, host)
    host.refresh_from_db()
    assert host.status == Host.Status.ONLINE


def _start(argv, env, timeout=60):
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.e2e
@pytest.mark.parametrize("node", ["worker", "web"])
def test_a_node_without_the_key_refuses_to_start_once_hosts_exist(tmp_path, node):
    """The real processes: a Celery worker and daphne, with a database that has a host and no
    key at CTWEB_SSH_KEY, exit at once with the one sentence, and make no key."""
    bin_ = os.path.dirname(sys.executable)
    env = {
        k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "SECRET_KEY_FILE")
    }
    env.update(
        CTWEB_VAR_DIR=str(tmp_path),
        SECRET_KEY="k" * 50,
        CTWEB_SSH_KEY=str(tmp_path / "ssh" / "id_ed25519"),
        REDIS_URL=f"unix://{tmp_path}/no-redis.sock",
    )
    py = os.path.join(bin_, "python")
    assert _start([py, "manage.py", "migrate", "-v", "0"], env).returncode == 0
    made = _start(
        [
            py,
            "manage.py",
            "shell",
            "-c",
            "from hosts.models import Host; Host.objects.create(name='h1', address='127.0.0.9')",
        ],
        env,
    )
    assert made.returncode == 0, made.stderr
    argv = {
        "worker": [os.path.join(bin_, "celery"), "-A", "ctweb", "worker", "--pool", "threads"],
        "web": [os.path.join(bin_, "daphne"), "-p", "0", "ctweb.asgi:application"],
    }[node]
    p = _start(argv, env)
    assert p.returncode != 0
    assert (
        f"ctweb: The fleet's SSH key {tmp_path}/ssh/id_ed25519 is missing: this node cannot reach"
        in p.stdout + p.stderr
    )
    assert not (tmp_path / "ssh" / "id_ed25519").exists()
