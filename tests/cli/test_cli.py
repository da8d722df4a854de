"""The `ctweb` terminal client: its remotes file, and (on the real stack) its answers to a
wrong token, an unknown container and an unreachable dashboard: sentences, never tracebacks."""

from __future__ import annotations

import json
import stat

import pytest

from ctwebcli import config
from ctwebcli.follow import sentence
from tests.support.cli import CTWEB, ctweb  # noqa: F401
from tests.support.stack import free_port

# --- the remotes file (pure logic) ------------------------------------------------------


def test_the_remotes_file_is_only_its_owners(tmp_path, monkeypatch):
    cfg = tmp_path / "conf" / "config.json"
    monkeypatch.setenv("CTWEB_CONFIG", str(cfg))
    config.add("lab", "http://127.0.0.1:8000/", "secret-token")
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert stat.S_IMODE(cfg.parent.stat().st_mode) == 0o700
    assert config.resolve(None) == ("lab", "http://127.0.0.1:8000", "secret-token")
    config.add("prod", "https://ctweb.example", "t2", make_current=False)
    assert config.resolve(None)[0] == "lab"
    config.switch("prod")
    assert config.resolve(None)[1] == "https://ctweb.example"
    assert [p.name for p in cfg.parent.iterdir()] == ["config.json"]  # no temporary file left


@pytest.mark.parametrize("name", ["", "a;rm -rf /", "$(id)", "a b", "-x", "x" * 65, "../up"])
def test_a_remote_name_with_shell_characters_is_refused(tmp_path, monkeypatch, name):
    monkeypatch.setenv("CTWEB_CONFIG", str(tmp_path / "c.json"))
    with pytest.raises(config.ConfigError, match="not a remote name"):
        config.add(name, "http://127.0.0.1:8000", "t")
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("url", ["ftp://x", "127.0.0.1:8000", "http://", "http://u:p@h", "http://h/?a=1"])
def test_a_dashboard_address_that_is_not_one_is_refused(url):
    with pytest.raises(config.ConfigError):
        config.check_url(url)


def test_a_moves_sentence_says_strategy_downtime_and_bytes():
    op = {
        "kind": "migrate",
        "status": "success",
        "container": "c1",
        "target_host": "lab-b",
        "result": {"strategy": "post-copy", "downtime_ms": 781.4, "total_ms": 4210, "bytes_transferred": 3 << 20},
    }
    assert sentence(op) == "Moved c1 to lab-b: strategy post-copy, downtime 781 ms, 4.2 s in all, 3.0 MiB transferred."
    seen = {**op, "result": {**op["result"], "client_downtime_ms": 812.6}}
    assert sentence(seen).startswith(
        "Moved c1 to lab-b: strategy post-copy, downtime 781 ms, 813 ms as its clients saw it,"
    )
    failed = {**op, "status": "failure", "error": "CRIU refused the dump: nested user namespace."}
    assert sentence(failed) == "migrate of c1 failed: CRIU refused the dump: nested user namespace."
    why = {"class": "namespaces", "sentence": "A process runs in a namespace of its own.", "fix": "Stop it.",
           "line": "Error (criu/namespaces.c:460): Can't dump nested uts namespace for 1635", "host": "lab-a"}  # fmt: skip
    explained = {**failed, "result": {"explanation": why}}
    assert sentence(explained) == (
        "migrate of c1 failed on lab-a: A process runs in a namespace of its own. Fix: Stop it.\n"
        "CRIU refused the dump: nested user namespace."
    )


# --- against the real stack -------------------------------------------------------------


@pytest.mark.e2e
def test_it_adds_a_remote_only_with_a_token_that_works(stack, tmp_path):
    cfg = tmp_path / "config.json"
    bad = ctweb(cfg, "remote", "add", "lab", stack.url, stdin="not-a-token\n")
    assert bad.returncode == 2, bad
    assert "does not accept this token" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not cfg.exists()  # nothing stored

    good = ctweb(cfg, "remote", "add", "lab", stack.url, stdin=stack.tokens["carol"] + "\n")
    assert good.returncode == 0, good.stderr
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    listed = json.loads(ctweb(cfg, "--json", "remote", "list").stdout)
    assert listed == [{"name": "lab", "url": stack.url, "current": True}]
    assert stack.tokens["carol"] not in ctweb(cfg, "remote", "list").stdout  # the token is never printed


@pytest.mark.e2e
def test_its_errors_are_the_dashboards_sentences(stack, tmp_path):
    cfg = tmp_path / "config.json"
    env = {"CTWEB_URL": stack.url, "CTWEB_TOKEN": stack.tokens["carol"]}
    unknown = ctweb(cfg, "info", "no-such-container", env=env)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("Error: ") and "no-such-container" in unknown.stderr, unknown.stderr
    assert "Traceback" not in unknown.stderr

    viewer = ctweb(cfg, "stop", "no-such-container", env=env)  # a viewer may not change anything
    assert viewer.returncode == 2 and "Traceback" not in viewer.stderr, viewer.stderr
    assert "role" in viewer.stderr.lower(), viewer.stderr

    nobody = ctweb(cfg, "list", env={"CTWEB_URL": f"http://127.0.0.1:{free_port()}", "CTWEB_TOKEN": "x"})
    assert nobody.returncode == 2 and "Cannot reach the dashboard" in nobody.stderr, nobody.stderr

    no_remote = ctweb(cfg, "list")
    assert no_remote.returncode == 2 and "ctweb remote add" in no_remote.stderr

    hosts = ctweb(cfg, "--json", "hosts", env=env)
    assert hosts.returncode == 0 and isinstance(json.loads(hosts.stdout), list)
    table = ctweb(cfg, "list", env=env)  # not a terminal: no colours
    assert table.returncode == 0 and "NAME" in table.stdout and "\x1b[" not in table.stdout


@pytest.mark.e2e
def test_a_destructive_verb_without_a_terminal_needs_yes(stack, tmp_path):
    env = {"CTWEB_URL": stack.url, "CTWEB_TOKEN": stack.tokens["bob"]}
    r = ctweb(tmp_path / "c.json", "delete", "anything", env=env)
    assert r.returncode == 2 and "--yes" in r.stderr, r.stderr


@pytest.mark.e2e
def test_it_follows_an_operation_by_polling_when_the_websocket_cannot_be_opened(stack):
    from ctwebcli.client import Client
    from ctwebcli.follow import _Plain, follow

    stack.python(  # a trusted host on a port that refuses at once: its probe fails fast
        "from hosts.models import Host\n"
        "Host.objects.get_or_create(name='cli-h1', defaults=dict(address='127.0.0.1', port=1, status='trusted',"
        " key_type='ssh-ed25519', key_data='AAAAC3NzaC1lZDI1NTE5AAAAIGbXYqIV8bzRLxNfJ6vHR5cP2xvQ6QFqD7PbSqPXW0Mg',"
        " fingerprint='SHA256:test'))"
    )
    client = Client(stack.url, stack.tokens["bob"])
    live = follow(client, client.post("/api/v1/hosts/cli-h1/probe")["id"], _Plain(quiet=True))
    assert (live["kind"], live["status"]) == ("probe", "failure")

    nowhere = f"ws://127.0.0.1:{free_port()}"  # the websocket cannot be opened: the client polls
    client.ws_url = lambda path: nowhere + path
    polled = follow(client, client.post("/api/v1/hosts/cli-h1/probe")["id"], _Plain(quiet=True))
    assert (polled["kind"], polled["status"]) == ("probe", "failure")
    assert polled["error"] and polled["events"], polled  # the whole row, as over the websocket
