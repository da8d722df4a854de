"""The ctweb command as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CTWEB = Path(sys.executable).parent / "ctweb"
# The installed command imports the client of this checkout, not the one the shared virtualenv's
# editable install points at (a worktree's venv is the main checkout's).
CHECKOUT = Path(__file__).resolve().parents[2]


def ctweb(cfg: Path, *args: str, env: dict | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    """The installed command, as a user runs it (stdin and stdout not a terminal)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("CTWEB_")}
    e.update(CTWEB_CONFIG=str(cfg), PYTHONPATH=str(CHECKOUT), **(env or {}))
    return subprocess.run([str(CTWEB), *args], capture_output=True, text=True, env=e, input=stdin, timeout=120)
