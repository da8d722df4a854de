"""REDIS_URL through Redis Sentinel, for real: a Redis master and a replica on loopback, one
Sentinel watching them; Django's cache, the Channels layer and the Celery broker of a node
configured with redis+sentinel:// reach the master, and again after a failover."""

import os
import subprocess
import sys

import pytest
import redis

from tests.support.stack import ROOT, Process, free_port, wait_for

pytestmark = pytest.mark.e2e

CLIENT = """
import asyncio, sys
import django
django.setup()
from django.conf import settings
from django.core.cache import cache
from channels.layers import get_channel_layer
from ctweb.celery import app

word = sys.argv[1]
cache.set("sentinel-check", word, 60)
assert cache.get("sentinel-check") == word

async def layer():
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add("sentinel-check", channel)
    await layer.group_send("sentinel-check", {"type": "x", "word": word})
    return (await asyncio.wait_for(layer.receive(channel), 10))["word"]

assert asyncio.run(layer()) == word
with app.connection_for_write() as conn:
    queue = conn.SimpleQueue("sentinel-check")
    queue.put({"word": word})
    got = queue.get(timeout=10)
    got.ack()
    assert got.payload == {"word": word}, got.payload
    queue.close()
print("ok", settings.CELERY_BROKER_URL)
"""


def _redis(tmp_path, name, port, *extra):
    return Process(
        name,
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), *extra],
        dict(os.environ),
        tmp_path / f"{name}.log",
    ).start()  # fmt: skip


@pytest.fixture
def sentinel(tmp_path):
    master, replica, sport = free_port(), free_port(), free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sport}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor ctweb 127.0.0.1 {master} 1\n"
        "sentinel down-after-milliseconds ctweb 1000\nsentinel failover-timeout ctweb 5000\n"
    )
    procs = [
        _redis(tmp_path, "master", master),
        _redis(tmp_path, "replica", replica, "--replicaof", "127.0.0.1", str(master)),
    ]
    procs.append(
        Process("sentinel", ["redis-server", str(conf), "--sentinel"], dict(os.environ), tmp_path / "s.log").start()
    )
    s = redis.Redis(port=sport)
    wait_for(lambda: s.sentinel_master("ctweb")["num-slaves"] == 1, 20, "the sentinel to see the replica")
    try:
        yield {"sentinel": s, "port": sport, "master": master, "replica": replica}
    finally:
        for p in reversed(procs):
            p.stop()


def _node(tmp_path, url: str, word: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "SECRET_KEY_FILE")}
    env.update(
        CTWEB_VAR_DIR=str(tmp_path / "var"), SECRET_KEY="s" * 40, REDIS_URL=url, DJANGO_SETTINGS_MODULE="ctweb.settings"
    )
    return subprocess.run(
        [sys.executable, "-c", CLIENT, word], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_a_node_uses_redis_through_sentinel_and_follows_a_failover(tmp_path, sentinel):
    url = f"redis+sentinel://127.0.0.1:{sentinel['port']}/ctweb/3"
    first = _node(tmp_path, url, "before")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("ok sentinel://127.0.0.1:")
    assert redis.Redis(port=sentinel["master"], db=3).dbsize() > 0  # on the master, in database 3

    sentinel["sentinel"].execute_command("SENTINEL", "FAILOVER", "ctweb")
    wait_for(
        lambda: sentinel["sentinel"].sentinel_get_master_addr_by_name("ctweb")[1] == sentinel["replica"],
        30,
        "the failover",
    )
    wait_for(lambda: redis.Redis(port=sentinel["replica"]).role()[0] == b"master", 30, "the replica to be master")
    after = _node(tmp_path, url, "after")
    assert after.returncode == 0, after.stderr[-3000:]
    assert redis.Redis(port=sentinel["replica"], db=3).get(":1:sentinel-check") is not None
