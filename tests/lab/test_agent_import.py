"""An import killed on its host (SIGKILL, as when the host's agent dies mid-upload) leaves its
staging directories; the import's recovery asks the host (`inspect`, under the lock the import
held) and that removes them, and nothing of the import is in place (hosts/agent exports.py,
commands.py; the recovery: containers/exports.py `recover_import`). For real on the lab: the
agent's zipapp over SSH, fed half of a real export archive. Needs root."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support.agent_loader import small_export
from tests.support.criu import REMOTE_AGENT, _ssh_args, ok, ssh, wait_for

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

NAME = "imp-killed"
# What an import of NAME can leave: the container, its snapshots, its staging directories.
LEFT = (
    f"ls -a /var/lib/lxc /var/lib/ctweb/snapshots 2>/dev/null | grep -e '^{NAME}$' -e '^.ctweb-import-{NAME}-' || true"
)


def left(lab, host) -> list[str]:
    return ssh(lab, host, "sh", "-c", LEFT).stdout.decode().split()


def test_a_killed_imports_staging_is_removed_by_its_recoverys_inspect(lab, hosts, tmp_path):
    b = hosts[1]
    data = small_export(tmp_path / "src")
    # The agent's pid first (the shell execs into the agent), then the import reads its stdin.
    proc = subprocess.Popen(
        _ssh_args(lab, b, "sh", "-c", f"echo $$ >&2; exec python3 {REMOTE_AGENT} import"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        pid = int(proc.stderr.readline())
        proc.stdin.write(json.dumps({"name": NAME, "stall_s": 300}).encode() + b"\n" + data[: len(data) // 2])
        proc.stdin.flush()
        staged = wait_for(lambda: [n for n in left(lab, b) if n.startswith(".ctweb-import-")], timeout=30)
        assert len(staged) == 2, staged  # one under /var/lib/lxc, one under the snapshots
        assert ssh(lab, b, "kill", "-KILL", str(pid)).returncode == 0
        proc.stdin.close()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    said = [json.loads(line) for line in proc.stdout.read().decode().splitlines() if line.strip()]
    assert all(line["type"] == "event" for line in said), said  # killed: no result, no error
    assert sorted(left(lab, b)) == sorted(staged)  # a SIGKILL cleans nothing up itself

    seen = ok(lab, b, "inspect", {"name": NAME, "snapshot": "s1"})  # what recover_import asks
    assert seen["removed_import_staging"] is True
    assert seen["exists"] is False and seen["snapshot"] is None  # nothing of it was placed
    assert left(lab, b) == []
    assert "removed_import_staging" not in ok(lab, b, "inspect", {"name": NAME})
