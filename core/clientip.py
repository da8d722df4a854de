"""The address a request came from, behind a reverse proxy or not.

REMOTE_ADDR is the peer of the socket. Only when that peer is one of TRUSTED_PROXIES is the
X-Forwarded-For header believed at all, and then only as far as it was written by trusted
proxies: the addresses are read from the right (the one the nearest proxy added) and the
first that is not itself a trusted proxy is the client. Anything left of it was written by
the client and is ignored, so a client cannot choose its own address by sending the header.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from django.conf import settings


def parse_networks(values) -> list:
    """TRUSTED_PROXIES as networks; a bad entry raises ValueError naming it."""
    out = []
    for v in values:
        v = str(v).strip()
        if not v:
            continue
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ValueError(
                f"TRUSTED_PROXIES: {v!r} is not an address or network (like 10.0.0.1 or 10.0.0.0/8)"
            ) from None
    return out


@lru_cache(maxsize=8)
def _networks(values: tuple) -> list:
    return parse_networks(values)


def _addr(text: str):
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6] or [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        a = ipaddress.ip_address(text)
    except ValueError:
        return None
    if a.version == 6 and a.ipv4_mapped:
        return a.ipv4_mapped
    return a


def _trusted(a, nets) -> bool:
    return any(a.version == n.version and a in n for n in nets)


def client_ip(request) -> str | None:
    remote = _addr(request.META.get("REMOTE_ADDR") or "")
    if remote is None:
        return None
    nets = _networks(tuple(getattr(settings, "TRUSTED_PROXIES", ()) or ()))
    if not nets or not _trusted(remote, nets):
        return str(remote)
    client = remote
    for hop in reversed(request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")):
        a = _addr(hop)
        if a is None:  # garbage written by someone: believe no further than the last good hop
            break
        client = a
        if not _trusted(a, nets):
            break
    return str(client)
