"""The `ctweb` terminal client on the real lab: the seed article's session, typed as an
operator would: `move` there and back with --json, a stateful `snapshot` under a
pseudo-terminal showing its progress bar, `info` listing it, and a 409 naming the running
operation."""

from __future__ import annotations

import json
import os
import pty
import subprocess

import pytest

from tests.support.cli import CTWEB, ctweb
from tests.support.lab import PATTERN, counter, create, pattern
from tests.support.stack import Api, ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]


@pytest.fixture
def cfg(lab_stack, tmp_path):
    path = tmp_path / "config.json"
    r = ctweb(path, "remote", "add", "lab", lab_stack.url, stdin=lab_stack.tokens["bob"] + "\n")
    assert r.returncode == 0, r.stderr
    return path


@pytest.fixture
def container(lab_stack, lab):
    bob = Api(lab_stack, lab_stack.tokens["bob"])
    name = "cli1"
    ok(create(bob, name=name, host="lab-a", command=["sh", "-c", PATTERN]))
    wait_for(lambda: counter(lab, "lab-a", name) > 2, 30, "it to count")
    yield name
    if bob.get(f"/api/v1/containers/{name}/").status_code == 200:
        run_op(bob, "DELETE", f"/api/v1/containers/{name}/")


def under_a_terminal(cfg, *args: str) -> tuple[int, str]:
    """Run ctweb with a pseudo-terminal as its stdin, stdout and stderr; (status, what it drew)."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTWEB_")}
    env.update(CTWEB_CONFIG=str(cfg), TERM="xterm-256color", COLUMNS="120", LINES="40")
    proc = subprocess.Popen([str(CTWEB), *args], stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(60), out.decode(errors="replace")


def test_a_move_there_and_back_speaks_json(lab_stack, lab, cfg, container):
    before = counter(lab, "lab-a", container)
    there = ctweb(cfg, "--json", "move", container, "lab-b")
    assert there.returncode == 0, there.stderr
    op = json.loads(there.stdout)  # only JSON on stdout: a script can read it
    assert (op["kind"], op["status"], op["target_host"]) == ("migrate", "success", "lab-b")
    assert op["result"]["strategy"] in ("post-copy", "stop-and-copy") and op["result"]["downtime_ms"] > 0
    assert there.stderr == ""  # no progress lines with --json

    back = ctweb(cfg, "--json", "move", container, "lab-a:", "--strategy", "stop-and-copy")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["result"]["strategy"] == "stop-and-copy"
    rows = json.loads(ctweb(cfg, "--json", "list").stdout)
    assert [(r["host"], r["state"]) for r in rows if r["name"] == container] == [("lab-a", "RUNNING")]
    assert counter(lab, "lab-a", container) >= before  # it went on, not started over
    start_sum, now_sum = pattern(lab, "lab-a", container)
    assert start_sum == now_sum  # its memory came along both ways

    plain = ctweb(cfg, "move", container, "lab-b", "--strategy", "stop-and-copy")  # not a terminal: lines
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith(f"Moved {container} to lab-b: strategy stop-and-copy, downtime ")
    assert "transfer" in plain.stderr and "\x1b[" not in plain.stderr + plain.stdout


def test_a_stateful_snapshot_draws_its_progress_in_a_terminal(lab_stack, lab, cfg, container):
    status, screen = under_a_terminal(cfg, "snapshot", container, "snap0", "--stateful")
    assert status == 0, screen
    assert "━" in screen and "100%" in screen, screen  # the bar, drawn to its end
    assert f"of {container} done in " in screen, screen

    info = ctweb(cfg, "info", container)
    assert info.returncode == 0, info.stderr
    assert "snap0 (taken at " in info.stdout and "(stateful)" in info.stdout, info.stdout
    assert "snapshot success" in info.stdout, info.stdout  # its recent operations


def test_a_second_operation_is_refused_naming_the_running_one(lab_stack, lab, cfg, container):
    started = ctweb(cfg, "--json", "move", container, "lab-b", "--no-wait")
    assert started.returncode == 0, started.stderr
    op_id = json.loads(started.stdout)["id"]
    refused = ctweb(cfg, "stop", container)
    assert refused.returncode == 2, refused
    assert refused.stderr.startswith("Error: ") and "Traceback" not in refused.stderr
    assert f"operations/{op_id}/" in refused.stderr or f"operation {op_id}" in refused.stderr, refused.stderr

    followed = ctweb(cfg, "--json", "operation", str(op_id), "--follow")
    assert followed.returncode == 0 and json.loads(followed.stdout)["status"] == "success", followed

    gone = ctweb(cfg, "restore", container, "no-such-snap", "--yes")
    assert gone.returncode == 2 and "no snapshot named 'no-such-snap'" in gone.stderr, gone.stderr
    deleted = ctweb(cfg, "--json", "delete", container, "--yes")
    assert deleted.returncode == 0 and json.loads(deleted.stdout)["status"] == "success", deleted.stderr
