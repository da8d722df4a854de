"""REDIS_URL, read once for the three clients that share Redis: the Channels layer, the Celery
broker and Django's cache (login throttling).

Three forms:
- `unix:///path/redis.sock` (the private Redis of `make run`, and the tests' stacks);
- `redis://[[user]:password@]host:port[/db]` or `rediss://...` (one server);
- `redis+sentinel://[[user]:password@]host:port[,host:port...]/master[/db]`: the Sentinels to ask
  and the name of the master they watch; the password is the master's (the Sentinels are asked
  without one). Every node finds the current master through them, and finds the new one after
  a failover.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

SENTINEL_SCHEME = "redis+sentinel"
_PLAIN_SCHEMES = ("unix", "redis", "rediss")
_HOST_PORT = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$")


class BadRedisURL(ValueError):
    pass


@dataclass(frozen=True)
class RedisTarget:
    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)


def parse(url: str) -> RedisTarget:
    """REDIS_URL -> what the clients need, or BadRedisURL saying what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in (*_PLAIN_SCHEMES, SENTINEL_SCHEME):
        raise BadRedisURL(
            f"REDIS_URL {_safe(url)!r} is not one of unix:///path, redis://host:port/db, rediss://host:port/db "
            f"or {SENTINEL_SCHEME}://host:port[,host:port...]/master[/db]."
        )
    if scheme != SENTINEL_SCHEME:
        return RedisTarget(url=url)
    userinfo, at, hostpart = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    hosts, slash, path = hostpart.partition("/")
    parts = [p for p in path.split("/") if p] if slash else []
    if not parts or len(parts) > 2:
        raise BadRedisURL(f"REDIS_URL {_safe(url)!r} names no master: {SENTINEL_SCHEME}://host:port/master[/db].")
    master = unquote(parts[0])
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise BadRedisURL(f"REDIS_URL {_safe(url)!r}: the database must be a number, not {parts[1]!r}.")
        db = int(parts[1])
    sentinels = []
    for item in hosts.split(","):
        m = _HOST_PORT.match(item.strip())
        if not m or not 0 < int(m.group(3)) < 65536:
            raise BadRedisURL(f"REDIS_URL {_safe(url)!r}: {item!r} is not host:port.")
        sentinels.append((m.group(1) or m.group(2), int(m.group(3))))
    return RedisTarget(url=url, sentinels=tuple(sentinels), master=master, db=db, username=username, password=password)


def _safe(url: str) -> str:
    """The URL without its password, for error messages."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _auth(t: RedisTarget) -> dict:
    return {k: v for k, v in (("username", t.username), ("password", t.password)) if v is not None}


def channel_layer_host(t: RedisTarget, socket_timeout: float) -> dict:
    """One entry of channels_redis' `hosts`."""
    if not t.is_sentinel:
        return {"address": t.url, "socket_timeout": socket_timeout}
    return {
        "sentinels": list(t.sentinels),
        "master_name": t.master,
        "db": t.db,
        "socket_timeout": socket_timeout,
        **_auth(t),
    }


def celery_broker(t: RedisTarget) -> tuple[str, dict]:
    """Celery's broker URL and the transport options it needs beside it (kombu's forms)."""
    if not t.is_sentinel:
        if t.url.startswith("unix://"):
            return "redis+socket://" + t.url[len("unix://") :], {}
        return t.url, {}
    auth = ""
    if t.password is not None:
        auth = f"{t.username or ''}:{t.password}@"
    url = ";".join(f"sentinel://{auth}{_netloc(h, p)}/{t.db}" for h, p in t.sentinels)
    return url, {"master_name": t.master}


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def django_cache(t: RedisTarget) -> dict:
    """Django's CACHES['default'] (its own Redis backend)."""
    if not t.is_sentinel:
        return {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": t.url}
    # A list, so Django does not split the Sentinels' commas into "servers".
    return {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": [t.url],
        "OPTIONS": {"pool_class": "core.redisconf.SentinelPool"},
    }


class SentinelPool(SentinelConnectionPool):
    """A redis-py pool to the master the Sentinels of a redis+sentinel:// URL name, built the
    way Django's cache builds its pools (`pool_class.from_url(url, **options)`)."""

    @classmethod
    def from_url(cls, url: str, **kwargs):
        t = parse(url)
        if not t.is_sentinel:
            return redis.ConnectionPool.from_url(url, **kwargs)
        kwargs.pop("db", None)
        return cls(t.master, Sentinel(list(t.sentinels)), db=t.db, **_auth(t), **kwargs)
