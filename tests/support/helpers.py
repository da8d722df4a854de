from contextlib import contextmanager

import pytest
from django.apps import apps
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session

from core.models import ApiToken
from core.roles import set_role
from hosts import ssh
from hosts.models import Host

ROLE_OF = {"alice": "admin", "bob": "operator", "carol": "viewer", "dave": None}


@pytest.fixture
def users(db):
    out = {}
    for name, role in ROLE_OF.items():
        u = get_user_model().objects.create_user(username=name, password=f"{name}-password-1")
        set_role(u, role)
        out[name] = u
    return out


@pytest.fixture
def tokens(users):
    return {name: ApiToken.issue(u, "test")[1] for name, u in users.items()}


@pytest.fixture
def trusted_host(db):
    # Port 1 on loopback refuses at once: anything that tries SSH fails fast and clearly.
    return Host.objects.create(
        name="h1",
        address="127.0.0.1",
        port=1,
        status=Host.Status.ONLINE,
        key_type="ssh-ed25519",
        key_data="AAAAC3NzaC1lZDI1NTE5AAAAIGbXYqIV8bzRLxNfJ6vHR5cP2xvQ6QFqD7PbSqPXW0Mg",
        fingerprint="SHA256:x",
    )


IGNORED_FIELDS = {"last_used_at", "last_login"}  # bookkeeping of who authenticated, not a change


def db_state() -> dict:
    """Every row of every table (sessions aside), for 'nothing changed' comparisons."""
    out = {}
    for model in apps.get_models(include_auto_created=True):
        if model is Session:
            continue
        rows = [
            {k: v for k, v in row.items() if k not in IGNORED_FIELDS} for row in model.objects.order_by("pk").values()
        ]
        out[model._meta.label] = rows
    return out


@contextmanager
def sshd_host(settings, tmp_path, name: str):
    """A real sshd on loopback (tests.support.stack.SSHServer) with the fleet's key made for
    this test, and a trusted, online Host row pinned to its host key: (server, host)."""
    from tests.support.stack import SSHServer

    settings.SSH_KEY_PATH = tmp_path / "key" / "id_ed25519"
    ssh.create_keypair(settings.SSH_KEY_PATH)
    srv = SSHServer(ssh.public_key_line()).start()
    pub = (srv.dir / "host_key.pub").read_text().split()
    host = Host.objects.create(
        name=name,
        address="127.0.0.1",
        port=srv.port,
        username="root",
        status=Host.Status.ONLINE,
        key_type=pub[0],
        key_data=pub[1],
        fingerprint=srv.fingerprint(),
    )
    try:
        yield srv, host
    finally:
        ssh._pool.pop(host.pk, None)
        srv.cleanup()
