"""The host agent package (hosts/agent/ctweb_agent) loaded for a test as a fresh copy of its
own: its modules under a new name, so two agents (a source and a target) can live in one
process, each with its own module-global state. Standard library only: the receive property
test uses it inside its private mount namespace."""

from __future__ import annotations

import importlib
import importlib.util
import io
import itertools
import sys
import tempfile
import types
import zipfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "hosts" / "agent" / "ctweb_agent"
_copies = itertools.count()


def load_agent(where: str | Path = PACKAGE_DIR, root: Path | None = None) -> types.SimpleNamespace:
    """The agent's names from all its modules in one namespace (`agent.cmd_receive`,
    `agent.AgentError`, ...), plus `agent.S`, the one place of its module-global state (its
    paths: set `agent.S.LXC_PATH`, never `agent.LXC_PATH`), and each module by name
    (`agent.common`: patch `agent.common.emit` to see its events). `where` is the package
    directory, or a built .pyz. With `root`, its paths point below root (lxc/, ctweb/)."""
    where = Path(where)
    if where.suffix == ".pyz":
        unpacked = Path(tempfile.mkdtemp(prefix="ctweb-agent-"))
        with zipfile.ZipFile(where) as z:
            z.extractall(unpacked)
        where = unpacked / "ctweb_agent"
    alias = f"ctweb_agent_under_test_{next(_copies)}"
    spec = importlib.util.spec_from_file_location(alias, where / "__init__.py", submodule_search_locations=[str(where)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[alias] = package
    spec.loader.exec_module(package)
    agent = types.SimpleNamespace()
    for path in sorted(where.glob("*.py")):
        if path.stem in ("__init__", "__main__"):
            continue
        module = importlib.import_module(f"{alias}.{path.stem}")
        setattr(agent, path.stem, module)
    for path in sorted(where.glob("*.py")):
        if path.stem in ("__init__", "__main__", "state"):
            continue
        for key, value in vars(getattr(agent, path.stem)).items():
            if not key.startswith("__") and not isinstance(value, types.ModuleType):
                setattr(agent, key, value)
    agent.S = agent.state
    if root is not None:
        lxc, ctweb = root / "lxc", root / "ctweb"
        lxc.mkdir(parents=True, exist_ok=True)
        ctweb.mkdir(parents=True, exist_ok=True)
        agent.S.LXC_PATH = str(lxc)
        agent.S.CTWEB_PATH = str(ctweb)
        agent.S.MIGRATIONS_PATH = str(ctweb / "migrations")
        agent.S.SNAPSHOTS_PATH = str(ctweb / "snapshots")
        agent.S.STATE_PATH = str(ctweb / "state")
    return agent


def small_export(root: Path, name: str = "c1", snap: str = "s1") -> bytes:
    """A real export archive (the agent's own writer) of a small stateless snapshot made for it
    under `root`, for tests of what the dashboard does with one."""
    agent = load_agent(root=root)
    sdir = root / "ctweb" / "snapshots" / name / snap
    (sdir / "rootfs").mkdir(parents=True)
    (sdir / "rootfs" / "hello").write_text("hello")
    (sdir / "config").write_text("lxc.tty.max = 4\n")
    (sdir / "meta.json").write_text('{"stateful": false, "created_at": "2026-12-01T10:00:00+00:00"}')
    buf = io.BytesIO()
    agent.write_export(buf, name, snap)
    return buf.getvalue()
