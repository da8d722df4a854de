"""Remotes: named dashboards with their tokens, in one JSON file only its owner may read.

The file is ``$CTWEB_CONFIG`` or ``~/.config/ctweb/config.json``:
``{"current": NAME, "remotes": {NAME: {"url": URL, "token": TOKEN}}}``. It is written to a
temporary file created 0600 in the same directory (0700) and renamed over the old one, so a
crash never leaves half a file and the token is never readable by others, not even briefly.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(Exception):
    """A sentence for the user."""


def path() -> Path:
    env = os.environ.get("CTWEB_CONFIG")
    return Path(env) if env else Path.home() / ".config" / "ctweb" / "config.json"


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise ConfigError(
            f"{name!r} is not a remote name: use letters, digits, '.', '_' or '-' (at most 64, starting with a "
            "letter or digit)."
        )
    return name


def check_url(url: str) -> str:
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{url!r} is not a dashboard address: give it as http(s)://HOST[:PORT].")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{url!r}: give the dashboard's address only, without user, query or fragment.")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def load() -> dict:
    p = path()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        return {"current": None, "remotes": {}}
    except (OSError, ValueError) as e:
        raise ConfigError(f"The client's configuration {p} cannot be read ({e}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("remotes"), dict):
        raise ConfigError(f"The client's configuration {p} is not in the expected form.")
    return data


def save(data: dict) -> None:
    p = path()
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def add(name: str, url: str, token: str, make_current: bool = True) -> None:
    data = load()
    data["remotes"][check_name(name)] = {"url": check_url(url), "token": token}
    if make_current or not data.get("current"):
        data["current"] = name
    save(data)


def remove(name: str) -> None:
    data = load()
    if name not in data["remotes"]:
        raise ConfigError(f"There is no remote named {name!r}.")
    del data["remotes"][name]
    if data.get("current") == name:
        data["current"] = next(iter(sorted(data["remotes"])), None)
    save(data)


def switch(name: str) -> None:
    data = load()
    if name not in data["remotes"]:
        raise ConfigError(f"There is no remote named {name!r} (`ctweb remote list` shows them).")
    data["current"] = name
    save(data)


def resolve(name: str | None) -> tuple[str, str, str]:
    """(remote name, url, token) to talk to: the named remote, else $CTWEB_URL with $CTWEB_TOKEN,
    else the current remote."""
    if not name and os.environ.get("CTWEB_URL"):
        token = os.environ.get("CTWEB_TOKEN")
        if not token:
            raise ConfigError("CTWEB_URL is set but CTWEB_TOKEN is not: a script needs both.")
        return "(environment)", check_url(os.environ["CTWEB_URL"]), token
    data = load()
    name = name or data.get("current")
    if not name:
        raise ConfigError("No remote yet: add one with `ctweb remote add NAME URL` (it asks for an API token).")
    remote = data["remotes"].get(name)
    if not remote:
        raise ConfigError(f"There is no remote named {name!r} (`ctweb remote list` shows them).")
    return name, remote["url"], remote["token"]
