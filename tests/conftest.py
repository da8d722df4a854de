import pytest

from tests.stack import SSHServer, Stack


@pytest.fixture(autouse=True)
def _in_memory_channel_layer(settings):
    # Unit tests publish into memory; the e2e stack has its own real Redis.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    # Hashing is deliberately slow in production; tests create many users.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # Pages render without a collectstatic run (the e2e stack serves the real thing).
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture(scope="session")
def stack():
    s = Stack()
    try:
        s.start()
    except Exception:
        print(s.logs())
        s.stop()
        raise
    s.tokens = s.make_users()
    yield s
    s.stop()


@pytest.fixture
def sshd(stack):
    server = SSHServer(stack.dashboard_public_key()).start()
    yield server
    server.cleanup()


from tests.helpers import tokens, trusted_host, users  # noqa: E402,F401  (shared fixtures)
