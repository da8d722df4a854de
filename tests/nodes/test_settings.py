"""What several nodes share comes from configuration: the SECRET_KEY, Redis (also through
Sentinel), the schedule that the one beat sends, the debug bundles' storage."""

import io
import os
import subprocess
import sys
import tarfile

import pytest
from django.conf import settings
from django.core.files.storage import storages

from core import redisconf
from ctweb.celery import app
from operations.bundles import bundle_bytes, bundle_files, save_bundle
from operations.models import Operation
from tests.support.stack import ROOT


def _settings_in(env_changes: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "SECRET_KEY_FILE", "DEBUG")}
    env.update(env_changes, DJANGO_SETTINGS_MODULE="ctweb.settings")
    code = "import django; django.setup(); from django.conf import settings; print(settings.SECRET_KEY)"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_without_debug_a_node_needs_a_secret_key(tmp_path):
    p = _settings_in({"CTWEB_VAR_DIR": str(tmp_path)})
    assert p.returncode != 0
    assert "SECRET_KEY is not set: give every web and worker node the same one" in p.stderr
    assert list(tmp_path.iterdir()) == []  # none made up


def test_the_secret_key_comes_from_the_environment_or_a_file(tmp_path):
    assert _settings_in({"CTWEB_VAR_DIR": str(tmp_path), "SECRET_KEY": "s" * 40}).stdout.strip() == "s" * 40
    (tmp_path / "key").write_text("f" * 40 + "\n")
    p = _settings_in({"CTWEB_VAR_DIR": str(tmp_path), "SECRET_KEY_FILE": str(tmp_path / "key")})
    assert p.stdout.strip() == "f" * 40
    short = _settings_in({"CTWEB_VAR_DIR": str(tmp_path), "SECRET_KEY": "short"})
    assert "SECRET_KEY is too short" in short.stderr


def test_debug_runs_without_one(tmp_path):
    assert _settings_in({"CTWEB_VAR_DIR": str(tmp_path), "DEBUG": "1"}).returncode == 0


def test_a_bad_redis_url_stops_the_node_with_a_sentence(tmp_path):
    p = _settings_in({"CTWEB_VAR_DIR": str(tmp_path), "SECRET_KEY": "s" * 40, "REDIS_URL": "sentinel://h:1"})
    assert p.returncode != 0
    assert "REDIS_URL 'sentinel://h:1' is not one of" in p.stderr


def test_the_time_after_which_a_silent_worker_is_lost_is_configured_and_bounded(tmp_path):
    def lost_after(value: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY_FILE", "DEBUG")}
        env.update(CTWEB_VAR_DIR=str(tmp_path), SECRET_KEY="s" * 40, CTWEB_LOST_AFTER=value)
        env["DJANGO_SETTINGS_MODULE"] = "ctweb.settings"
        code = (
            "import django; django.setup(); from django.conf import settings as s; "
            "print(s.OPERATION_LOST_AFTER_S, s.CELERY_BEAT_SCHEDULE['find-lost-operations']['schedule'])"
        )
        return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)

    assert settings.OPERATION_LOST_AFTER_S == 60  # the default
    assert lost_after("20").stdout.split() == ["20.0", "20.0"]  # the detector looks that often too
    short = lost_after("5")
    assert short.returncode != 0 and "CTWEB_LOST_AFTER must be at least 15" in short.stderr


def test_every_task_beat_sends_is_one_a_worker_runs():
    # The refresh was scheduled under a name no worker knew (the task had moved apps): every
    # 30 s the worker logged "Received unregistered task" and no container state was refreshed.
    app.loader.import_default_modules()
    names = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert names <= set(app.tasks), names - set(app.tasks)


# --- REDIS_URL ----------------------------------------------------------------------------


def test_plain_urls_are_used_as_they_are():
    t = redisconf.parse("unix:///srv/ctweb/redis.sock")
    assert not t.is_sentinel
    assert redisconf.celery_broker(t) == ("redis+socket:///srv/ctweb/redis.sock", {})
    assert redisconf.channel_layer_host(t, 15) == {"address": "unix:///srv/ctweb/redis.sock", "socket_timeout": 15}
    assert redisconf.django_cache(redisconf.parse("redis://r1:6379/2"))["LOCATION"] == "redis://r1:6379/2"
    assert redisconf.celery_broker(redisconf.parse("rediss://:pw@r1:6380/0")) == ("rediss://:pw@r1:6380/0", {})


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_database():
    t = redisconf.parse("redis+sentinel://:s%40cret@10.0.0.1:26379,sentinel-b:26380,[fd00::3]:26379/ctweb/2")
    assert t.sentinels == (("10.0.0.1", 26379), ("sentinel-b", 26380), ("fd00::3", 26379))
    assert (t.master, t.db, t.username, t.password) == ("ctweb", 2, None, "s@cret")
    url, options = redisconf.celery_broker(t)
    assert url == (
        "sentinel://:s@cret@10.0.0.1:26379/2;sentinel://:s@cret@sentinel-b:26380/2;sentinel://:s@cret@[fd00::3]:26379/2"
    )
    assert options == {"master_name": "ctweb"}
    assert redisconf.channel_layer_host(t, 15) == {
        "sentinels": [("10.0.0.1", 26379), ("sentinel-b", 26380), ("fd00::3", 26379)],
        "master_name": "ctweb",
        "db": 2,
        "socket_timeout": 15,
        "password": "s@cret",
    }
    cache = redisconf.django_cache(t)
    assert cache["LOCATION"] == [t.url]  # not split at the commas
    assert cache["OPTIONS"] == {"pool_class": "core.redisconf.SentinelPool"}
    pool = redisconf.SentinelPool.from_url(t.url, socket_timeout=3)
    assert pool.service_name == "ctweb"
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "s@cret"
    assert [s.connection_pool.connection_kwargs["host"] for s in pool.sentinel_manager.sentinels] == [
        "10.0.0.1",
        "sentinel-b",
        "fd00::3",
    ]


def test_a_sentinel_url_without_password_or_database():
    t = redisconf.parse("redis+sentinel://s1:26379/mymaster")
    assert (t.sentinels, t.master, t.db, t.password) == ((("s1", 26379),), "mymaster", 0, None)
    assert redisconf.celery_broker(t) == ("sentinel://s1:26379/0", {"master_name": "mymaster"})


@pytest.mark.parametrize(
    "url, says",
    [
        ("sentinel://s1:26379;sentinel://s2:26379", "is not one of"),
        ("redis+sentinel://s1:26379", "names no master"),
        ("redis+sentinel://s1:26379/", "names no master"),
        ("redis+sentinel://s1/master", "'s1' is not host:port"),
        ("redis+sentinel://s1:99999/master", "is not host:port"),
        ("redis+sentinel://s1:26379,/master", "'' is not host:port"),
        ("redis+sentinel://s1:26379/master/x", "the database must be a number"),
        ("redis+sentinel://s1:26379/a/1/2", "names no master"),
        ("localhost:6379", "is not one of"),
    ],
)
def test_bad_redis_urls_are_refused_with_what_is_wrong(url, says):
    with pytest.raises(redisconf.BadRedisURL, match=says):
        redisconf.parse(url)


def test_a_refused_url_does_not_show_its_password():
    with pytest.raises(redisconf.BadRedisURL) as e:
        redisconf.parse("redis+sentinel://:hunter2@s1:26379")
    assert "hunter2" not in str(e.value)


# --- debug bundles ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_bundles_go_through_the_configured_storage(settings, tmp_path):
    """Saved and served through settings.STORAGES["bundles"] (here Django's in-memory storage,
    as the fast tests configure it): nothing written under the node's own var/."""
    settings.VAR_DIR = tmp_path
    op = Operation.objects.create(kind="snapshot", status="failure")
    assert bundle_files(op) == [] and bundle_bytes(op) is None
    save_bundle(op.pk, "lab-a.tar.gz", io.BytesIO(b"first"))
    save_bundle(op.pk, "lab-a.tar.gz", io.BytesIO(b"again"))  # a second collection replaces it
    save_bundle(op.pk, "lab-b.tar.gz", io.BytesIO(b"bee"))
    assert type(storages["bundles"]).__name__ == "InMemoryStorage"
    assert bundle_files(op) == ["lab-a.tar.gz", "lab-b.tar.gz"]
    with tarfile.open(fileobj=io.BytesIO(bundle_bytes(op))) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert got == {f"op-{op.pk}/lab-a.tar.gz": b"again", f"op-{op.pk}/lab-b.tar.gz": b"bee"}
    assert list(tmp_path.iterdir()) == []


def test_by_default_bundles_are_files_under_var(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CTWEB_BUNDLE_STORAGE"}
    env.update(CTWEB_VAR_DIR=str(tmp_path), SECRET_KEY="s" * 40, DJANGO_SETTINGS_MODULE="ctweb.settings")
    code = "import django; django.setup(); from django.core.files.storage import storages; s = storages['bundles']; print(type(s).__name__, s.location)"
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["FileSystemStorage", str(tmp_path / "bundles")]
    env["CTWEB_BUNDLE_STORAGE"] = '{"BACKEND": "django.core.files.storage.InMemoryStorage"}'
    p = subprocess.run(
        [sys.executable, "-c", code.replace(", s.location", "")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.stdout.split() == ["InMemoryStorage"]
