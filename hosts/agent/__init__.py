"""The host agent ships as one file; the dashboard copies it to a host when its hash changes."""

import hashlib
from functools import lru_cache
from pathlib import Path

AGENT_PATH = Path(__file__).with_name("ctweb_agent.py")

# Subcommands the dashboard may ask for. The SSH module refuses any other word.
AGENT_SUBCOMMANDS = frozenset(
    {
        "probe",
        "migrate-prepare",
        "migrate-check",
        "send",
        "receive",
        "cpuinfo-check",
        "migrate-dump",
        "migrate-restore",
        "migrate-resume",
        "migrate-lazy-wait",
        "pages-attach",
        "migrate-abort",
        "migrate-cleanup",
        "list",
        "create",
        "start",
        "stop",
        "restart",
        "delete",
        "snapshot",
        "restore",
        "delete-snapshot",
        "snapshot-contents",
        "bundle",
        "inspect",
    }
)


@lru_cache(maxsize=1)
def agent_source() -> tuple[bytes, str]:
    source = AGENT_PATH.read_bytes()
    return source, hashlib.sha256(source).hexdigest()
