"""The host agent as shipped: one reproducible zipapp of the package hosts/agent/ctweb_agent,
named by its hash, that runs with a bare python3; the package holds standard-library imports
only; the dashboard's list of subcommands is the agent's own dispatch table."""

import ast
import hashlib
import io
import json
import shutil
import subprocess
import sys
import zipfile

import pytest

from hosts import agent as shipping
from hosts.agent.ctweb_agent import commands


def test_building_the_zipapp_twice_gives_the_same_bytes():
    first, second = shipping.build_zipapp(), shipping.build_zipapp()
    assert first == second
    data, digest = shipping.agent_source()
    assert data == first and digest == hashlib.sha256(first).hexdigest()
    assert shipping.agent_file_name() == f"ctweb-agent-{digest[:16]}.pyz"


def test_the_zipapp_holds_the_package_sorted_with_fixed_dates_and_modes():
    data = shipping.build_zipapp()
    assert data.startswith(b"#!/usr/bin/env python3\n")
    infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names)
    assert "__main__.py" in names and "ctweb_agent/__main__.py" in names and "ctweb_agent/commands.py" in names
    modules = sorted(
        f"ctweb_agent/{p.relative_to(shipping.PACKAGE_DIR).as_posix()}"
        for p in shipping.PACKAGE_DIR.rglob("*.py")
        if "__pycache__" not in p.parts
    )
    assert [n for n in names if n != "__main__.py"] == modules  # no caches, nothing else
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {i.external_attr >> 16 for i in infos} == {0o100644}
    assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}


def test_a_changed_module_changes_the_name(tmp_path, monkeypatch):
    before = shipping.build_zipapp()
    copy = tmp_path / "ctweb_agent"
    shutil.copytree(shipping.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(shipping, "PACKAGE_DIR", copy)
    assert shipping.build_zipapp() == before  # built from another place: the same bytes
    (copy / "common.py").write_text((copy / "common.py").read_text() + "\n# changed\n")
    assert hashlib.sha256(shipping.build_zipapp()).digest() != hashlib.sha256(before).digest()


@pytest.mark.skipif(shutil.which("python3") is None, reason="needs a python3 on PATH, as the hosts have")
def test_the_zipapp_runs_with_a_bare_python3_and_lists_its_subcommands(tmp_path):
    pyz = tmp_path / shipping.agent_file_name()
    pyz.write_bytes(shipping.agent_source()[0])
    # -I -S: no site-packages, no environment; an unknown word stops before touching anything
    proc = subprocess.run(
        ["python3", "-I", "-S", str(pyz), "no-such-command"], input=b"{}\n", capture_output=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    error = json.loads(proc.stdout)
    assert error["type"] == "error" and error["message"].startswith("usage: ctweb-agent {")
    listed = set(error["message"].split("{", 1)[1].rstrip("}").split(","))
    assert listed == set(commands.COMMANDS)


@pytest.mark.parametrize("word", ["send", "receive", "migrate-restore"])
def test_a_stream_started_ahead_and_never_used_does_nothing(tmp_path, word):
    """The relay starts its streams before a migration's freeze, the migration its restore's agent
    (hosts/ssh.py PRESTARTABLE), and closes the unused ones: the end of input before any
    parameters asks nothing."""
    pyz = tmp_path / shipping.agent_file_name()
    pyz.write_bytes(shipping.agent_source()[0])
    proc = subprocess.run(["python3", "-I", "-S", str(pyz), word], input=b"", capture_output=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")


def test_the_dashboard_asks_only_for_the_agents_own_subcommands():
    from hosts import ssh

    assert set(ssh.PRESTARTABLE) <= shipping.AGENT_SUBCOMMANDS
    assert shipping.AGENT_SUBCOMMANDS == frozenset(commands.COMMANDS) - {"pages-relay", "migrate-journal"}
    assert commands.INTERNAL == {"pages-relay", "migrate-journal"}
    assert commands.RAW_OUTPUT <= shipping.AGENT_SUBCOMMANDS and commands.LOCKED <= shipping.AGENT_SUBCOMMANDS
    assert all(callable(f) for f in commands.COMMANDS.values())


def test_the_agent_imports_the_standard_library_only():
    allowed_outside = {"pycriu"}  # the host distribution's, imported inside a try
    for path in sorted(shipping.PACKAGE_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                assert top in sys.stdlib_module_names or top in allowed_outside, f"{path.name} imports {top}"
