"""The host agent (the package `ctweb_agent` beside this file) ships as one zipapp: the
dashboard copies it to a host when its hash changes and runs it with the host's python3.

The zipapp is reproducible: its members in sorted order, stored (not compressed), with fixed
timestamps and modes, so building it twice, here or anywhere, gives the same bytes, and its
file name on the host (ctweb-agent-<sha256 prefix>.pyz) names exactly what it holds.
`python -m hosts.agent DIRECTORY` writes it there (to look at, or to copy by hand).
"""

import hashlib
import io
import zipfile
from functools import lru_cache
from pathlib import Path

from .ctweb_agent.commands import DASHBOARD_COMMANDS

PACKAGE_DIR = Path(__file__).with_name("ctweb_agent")

# Subcommands the dashboard may ask for, from the agent's own dispatch table. The SSH module
# refuses any other word.
AGENT_SUBCOMMANDS = DASHBOARD_COMMANDS

ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip member can carry
SHEBANG = b"#!/usr/bin/env python3\n"
ZIP_MAIN = b"import sys\n\nfrom ctweb_agent.__main__ import run\n\nsys.exit(run())\n"


def zipapp_members() -> list[tuple[str, bytes]]:
    """(name in the archive, content) of every member, sorted by name: the package's modules
    (no caches) and the archive's own __main__.py."""
    members = [("__main__.py", ZIP_MAIN)]
    for path in PACKAGE_DIR.rglob("*.py"):
        if "__pycache__" not in path.parts:
            members.append((f"ctweb_agent/{path.relative_to(PACKAGE_DIR).as_posix()}", path.read_bytes()))
    return sorted(members)


def build_zipapp() -> bytes:
    buf = io.BytesIO()
    buf.write(SHEBANG)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in zipapp_members():
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.create_system = 3  # Unix, whatever builds it
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_STORED
            z.writestr(info, data)
    return buf.getvalue()


@lru_cache(maxsize=1)
def agent_source() -> tuple[bytes, str]:
    """The zipapp's bytes and their SHA-256 (hex)."""
    data = build_zipapp()
    return data, hashlib.sha256(data).hexdigest()


def agent_file_name() -> str:
    """The zipapp's file name on a host: named by its hash."""
    return f"ctweb-agent-{agent_source()[1][:16]}.pyz"
