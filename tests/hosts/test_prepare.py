"""Preparing a host (hosts/prepare.py): which system and kernel get which packages, or which
one-sentence refusal; the operation's steps with a fake connection; the network description's
checks on both sides. The real thing runs on the lab: tests/hosts/test_e2e_lab_prepare.py."""

from __future__ import annotations

import pytest

from core.api import ApiError
from core.audit import Actor
from hosts import prepare, ssh
from hosts.models import Host
from operations import runner
from operations.models import Operation
from tests.support.agent_loader import load_agent


def facts(os_id="debian", version="13", kernel="6.12.48+deb13-amd64", **over):
    base = {
        "os_id": os_id,
        "version_id": version,
        "pretty_name": f"{os_id} {version}",
        "kernel": kernel,
        "root": True,
        "user": "root",
        "apt": True,
    }
    return {**base, **over}


def test_it_installs_debian_13s_own_criu_and_pycriu_on_its_own_kernel():
    p = prepare.plan(facts(kernel="6.12.48+deb13-amd64"))
    assert p.system == "Debian 13"
    assert {"lxc", "criu", "python3-pycriu", "rsync", "iptables", "busybox-static"} <= set(p.packages)
    assert p.extra_suite is None and p.extra_packages == () and p.notes == ()


def test_debian_13_on_a_kernel_from_6_16_takes_criu_and_pycriu_alone_from_sid():
    p = prepare.plan(facts(kernel="6.18.44-fc-v769"))
    assert "criu" not in p.packages and "python3-pycriu" not in p.packages
    assert (p.extra_suite, p.extra_packages) == ("sid", ("criu", "python3-pycriu"))
    assert len(p.notes) == 1 and "TCP or UDP sockets on kernel 6.18" in p.notes[0]


def test_debian_12_gets_criu_with_its_pycriu_on_its_own_kernel():
    p = prepare.plan(facts(version="12", kernel="6.1.0-41-amd64"))
    assert p.system == "Debian 12" and "criu" in p.packages and "python3-pycriu" not in p.packages


@pytest.mark.parametrize("kernel", ["6.13.0", "6.18.44-fc-v769", "7.0.1"])
def test_debian_12_on_a_kernel_from_6_13_is_refused_in_one_sentence_naming_the_vdso_error(kernel):
    with pytest.raises(prepare.Refused) as e:
        prepare.plan(facts(version="12", kernel=kernel), "h1")
    sentence = str(e.value)
    assert "Debian 12's CRIU 3.17 cannot run on h1's kernel" in sentence
    assert "vdso: Unexpected rt vDSO area bounds" in sentence
    assert sentence.count(". ") == 0 and sentence.endswith(".")


def test_ubuntu_24_04_gets_criu_on_its_6_8_kernel_and_is_refused_on_a_hwe_kernel_from_6_13():
    p = prepare.plan(facts("ubuntu", "24.04", "6.8.0-87-generic"))
    assert p.system == "Ubuntu 24.04" and "criu" in p.packages
    with pytest.raises(prepare.Refused, match="Ubuntu 24.04's CRIU 3.17 cannot run on h1's kernel 6.14"):
        prepare.plan(facts("ubuntu", "24.04", "6.14.0-35-generic"), "h1")


@pytest.mark.parametrize(
    "over, words",
    [
        ({"os_id": "ubuntu", "version_id": "22.04", "pretty_name": "Ubuntu 22.04.5 LTS"}, "runs Ubuntu 22.04.5 LTS"),
        ({"os_id": "fedora", "version_id": "41", "apt": False, "pretty_name": "Fedora 41"}, "without apt-get"),
        ({"root": False, "user": "ctweb"}, "ctweb's agent runs there as ctweb, who is not root"),
        ({"kernel": "weird"}, "cannot be read"),
    ],
)
def test_other_systems_users_and_kernels_are_refused_in_one_sentence(over, words):
    with pytest.raises(prepare.Refused) as e:
        prepare.plan(facts(**over), "h1")
    assert words in str(e.value) and str(e.value).endswith(".")


def test_the_steps_shares_add_up_to_the_whole_bar():
    assert sum(share for _, share in prepare.STEPS) == 100
    assert prepare.at("connect") == 0 and prepare.at("probe", 1) == 100
    assert prepare.at("packages", 0.5) == 10 + 30


@pytest.mark.parametrize(
    "network",
    [
        "10.0.3.0/24",
        {"subnet": "10.0.3.0/33"},
        {"subnet": "fd00::/64"},
        {"subnet": "10.0.3.0/24", "bridge": "br0; reboot"},
        {"subnet": "10.0.3.0/24", "range": [250, 100]},
        {"subnet": "10.0.3.0/24", "range": [1, True]},
        {"subnet": "10.0.3.0/24", "gateway": "10.0.4.1"},
        {"subnet": "10.0.3.0/24", "dns": "1.1.1.1"},
    ],
)
def test_a_bad_network_description_is_refused_before_anything_is_queued(db, trusted_host, network):
    with pytest.raises(ApiError) as e:
        prepare.start_prepare(Actor(None), trusted_host, network)
    assert e.value.status_code == 400 and e.value.field == "network"
    assert not Operation.objects.exists()


def test_a_good_network_description_is_kept_with_its_defaults(db, trusted_host, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks():
        op = prepare.start_prepare(Actor(None), trusted_host, {"subnet": "10.77.71.0/24"})
    assert op.kind == "prepare" and op.params["network"] == {
        "bridge": "lxcbr0",
        "subnet": "10.77.71.0/24",
        "range": [100, 250],
        "gateway": None,
    }
    with pytest.raises(ApiError) as e:  # one at a time per host
        prepare.start_prepare(Actor(None), trusted_host)
    assert e.value.status_code == 409


class FakeConnection:
    """A host's connection whose agent answers each prepare step from a table."""

    def __init__(self, host, answers):
        self.host, self.answers, self.calls = host, answers, []

    def ensure_agent(self):
        return "/var/lib/ctweb/agent/x.pyz"

    def run_agent(self, sub, params, on_event=None, timeout=None):
        key = params.get("step", sub)
        self.calls.append((sub, params))
        if on_event:
            on_event({"type": "event", "phase": key, "message": f"{key} half way", "progress": 50})
        answer = self.answers[key]
        if isinstance(answer, Exception):
            raise answer
        return ssh.AgentResult(answer, "", 0)


@pytest.fixture
def fake_host(monkeypatch, trusted_host):
    made = {}

    def use(answers):
        from contextlib import contextmanager

        @contextmanager
        def connect(host, timeout=None):
            made["conn"] = FakeConnection(host, answers)
            yield made["conn"]

        monkeypatch.setattr(ssh, "connect", connect)
        return made

    return use


def _run(host, network=None):
    op = Operation.objects.create(
        kind="prepare", host=host, phase="queued", params={"network": network} if network else {}
    )
    status = runner.run_operation(op.pk, "w@a")
    op.refresh_from_db()
    return status, op


def test_a_prepare_runs_its_steps_in_order_with_progress_and_ends_with_the_host_online(db, trusted_host, fake_host):
    Host.objects.filter(pk=trusted_host.pk).update(status=Host.Status.TRUSTED)
    made = fake_host(
        {
            "facts": facts(kernel="6.18.1"),
            "packages": {"packages": {"lxc": "1:6.0.4-4", "criu": "4.2.1-1"}},
            "network": {"subnet": "10.77.71.0/24", "bridge": "lxcbr0", "range": [100, 250], "gateway": None},
            "check": {"criu_version": "4.2.1", "criu_check": "ok"},
            "probe": {"criu_version": "4.2.1", "criu_check": "ok", "lxc_version": "6.0.4", "uffd": True},
        }
    )
    status, op = _run(trusted_host, {"subnet": "10.77.71.0/24", "bridge": "lxcbr0", "range": [100, 250]})
    assert status == "success", op.error
    steps = [p.get("step", sub) for sub, p in made["conn"].calls]
    assert steps == ["facts", "packages", "network", "check", "probe"]
    packages = made["conn"].calls[1][1]
    assert packages["extra_suite"] == "sid" and packages["extra_packages"] == ["criu", "python3-pycriu"]
    assert made["conn"].calls[2][1]["network"]["subnet"] == "10.77.71.0/24"
    progress = [e["progress"] for e in op.events if "progress" in e]
    assert progress == sorted(progress) and progress[-1] == 100
    assert {e["phase"] for e in op.events} >= {"connect", "facts", "packages", "network", "check", "probe"}
    assert any("TCP or UDP sockets" in e["message"] for e in op.events)
    trusted_host.refresh_from_db()
    assert trusted_host.status == "online" and trusted_host.capabilities["criu_version"] == "4.2.1"
    assert op.result["system"] == "Debian 13" and op.result["packages"]["criu"] == "4.2.1-1"


def test_a_refused_host_gets_the_sentence_and_nothing_is_installed(db, trusted_host, fake_host):
    made = fake_host({"facts": facts(version="12", kernel="6.18.44-fc-v769")})
    status, op = _run(trusted_host)
    assert status == "failure"
    assert op.error.startswith("Debian 12's CRIU 3.17 cannot run on h1's kernel 6.18")
    assert [p.get("step") for _, p in made["conn"].calls] == ["facts"]
    trusted_host.refresh_from_db()
    assert trusted_host.status == "online"  # a refusal is not the host being unreachable


def test_a_failing_criu_check_fails_the_prepare_with_the_agents_sentence_and_lines(db, trusted_host, fake_host):
    fake_host(
        {
            "facts": facts(),
            "packages": {"packages": {}},
            "network": {},
            "check": ssh.AgentFailed(
                "CRIU 4.1.1 does not work on this host's kernel 6.12: Error (criu/cr-check.c:1): something",
                "Error (criu/cr-check.c:1): something",
            ),
        }
    )
    status, op = _run(trusted_host)
    assert status == "failure" and op.error.startswith("CRIU 4.1.1 does not work")


# --- the agent's side ------------------------------------------------------------------


def test_the_agent_finds_the_mirror_of_its_own_release_in_either_source_format(tmp_path, monkeypatch):
    agent = load_agent()
    m = agent.prepare
    lists = tmp_path / "sources.list.d"
    lists.mkdir()
    (tmp_path / "sources.list").write_text("# nothing\ndeb [arch=amd64] http://mirror.example/debian trixie main\n")
    real_open, real_isdir, real_listdir = open, m.os.path.isdir, m.os.listdir

    def fake_open(path, *a, **kw):
        if path == "/etc/apt/sources.list":
            path = tmp_path / "sources.list"
        elif str(path).startswith("/etc/apt/sources.list.d/"):
            path = lists / str(path).rsplit("/", 1)[1]
        return real_open(path, *a, **kw)

    monkeypatch.setattr(m, "open", fake_open, raising=False)
    monkeypatch.setattr(m.os.path, "isdir", lambda p: True if p == "/etc/apt/sources.list.d" else real_isdir(p))
    monkeypatch.setattr(
        m.os, "listdir", lambda p: real_listdir(lists) if p == "/etc/apt/sources.list.d" else real_listdir(p)
    )
    assert m._mirror("trixie") == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("")
    (lists / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.debian.org/debian/\nSuites: trixie trixie-updates\nComponents: main\n"
    )
    assert m._mirror("trixie") == "http://deb.debian.org/debian"
    with pytest.raises(agent.AgentError, match="No apt source for bookworm"):
        m._mirror("bookworm")


@pytest.mark.parametrize(
    "params",
    [
        {"step": "packages", "packages": ["lxc; rm -rf /"]},
        {"step": "packages", "packages": ["-o=APT::Foo"]},
        {"step": "packages", "packages": []},
        {"step": "packages", "packages": ["lxc"], "extra_packages": ["criu"], "extra_suite": "sid main"},
        {"step": "network", "network": {"bridge": "lxcbr0", "subnet": "10.0.0.0/24", "range": [1, 300]}},
        {"step": "network", "network": {"bridge": "../x", "subnet": "10.0.0.0/24", "range": [1, 2]}},
        {"step": "reboot"},
    ],
)
def test_the_agent_refuses_bad_steps_before_running_anything(params, monkeypatch):
    agent = load_agent()
    ran = []
    monkeypatch.setattr(agent.prepare.os, "geteuid", lambda: 0)
    monkeypatch.setattr(agent.prepare, "_apt", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(agent.prepare, "run", lambda *a, **k: ran.append(a) or (0, "", ""))
    monkeypatch.setattr(agent.prepare, "_write", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(agent.prepare.os.path, "isdir", lambda p: True)
    with pytest.raises(agent.AgentError, match="Bad parameters"):
        agent.prepare.cmd_prepare(params)
    assert ran == []


def test_the_agents_facts_say_who_and_where_it_runs():
    agent = load_agent()
    f = agent.prepare.cmd_prepare({"step": "facts"})
    assert set(f) >= {"os_id", "version_id", "kernel", "root", "user", "apt"}
    assert prepare.kernel_version(f["kernel"]) is not None


# --- the API, the page and the command ---------------------------------------------------


def _api(tokens, who):
    from django.test import Client

    return Client(HTTP_AUTHORIZATION=f"Token {tokens[who]}")


def test_only_an_admin_may_prepare_through_the_api_and_a_bad_network_changes_nothing(
    tokens, trusted_host, django_capture_on_commit_callbacks, monkeypatch
):
    from operations import tasks
    from tests.support.helpers import db_state

    monkeypatch.setattr(tasks.run_operation_task, "delay", lambda pk: None)
    url = f"/api/v1/hosts/{trusted_host.name}/prepare"
    for who in ("carol", "bob"):
        assert _api(tokens, who).post(url, {}, content_type="application/json").status_code == 403
    before = db_state()
    r = _api(tokens, "alice").post(
        url, {"network": {"subnet": "10.0.3.0/24", "gateway": "10.9.9.1"}}, content_type="application/json"
    )
    assert (r.status_code, r.json()["field"]) == (400, "network") and "gateway" in r.json()["error"]
    r = _api(tokens, "alice").post(url, {"network": {"subnet": "10.0.3.0/24; reboot"}}, content_type="application/json")
    assert r.status_code == 400
    assert db_state() == before
    with django_capture_on_commit_callbacks(execute=True):
        r = _api(tokens, "alice").post(url, "", content_type="application/json")  # no body: keep or find the network
    assert r.status_code == 202, r.content
    op = Operation.objects.get(pk=r.json()["id"])
    assert (op.kind, op.params, op.created_by.username) == ("prepare", {}, "alice")


def test_the_host_page_offers_admins_a_prepare_button_behind_a_confirmation(users, trusted_host, client):
    client.force_login(users["alice"])
    page = client.get(f"/hosts/{trusted_host.name}/").content.decode()
    assert 'id="prepare-button"' in page and 'data-confirm="Prepare h1? ctweb installs LXC, CRIU' in page
    client.force_login(users["bob"])
    assert 'id="prepare-button"' not in client.get(f"/hosts/{trusted_host.name}/").content.decode()


def test_manage_py_host_prepare_runs_it_and_prints_its_steps(transactional_db, trusted_host, fake_host, capsys):
    from django.core.management import CommandError, call_command

    fake_host({"facts": facts(version="12", kernel="6.18.44-fc-v769")})
    with pytest.raises(CommandError, match="Debian 12's CRIU 3.17 cannot run on h1's kernel 6.18"):
        call_command("host", "prepare", "h1")
    out = capsys.readouterr().out
    assert "preparing h1" in out and "facts: reading the system" in out
    with pytest.raises(CommandError, match="--range must be FIRST-LAST"):
        call_command("host", "prepare", "h1", "--subnet", "10.0.3.0/24", "--range", "100")
    with pytest.raises(CommandError, match="No host named nope"):
        call_command("host", "prepare", "nope")


class FakeNetHost:
    """The agent's view of a host's bridges and its network description, in a temporary folder."""

    def __init__(self, agent, tmp_path, monkeypatch, bridges):
        import ipaddress

        self.m, self.bridges, self.lxc_net_started = agent.prepare, dict(bridges), 0
        self.file = tmp_path / "etc-ctweb" / "network.json"
        monkeypatch.setattr(self.m, "NETWORK_FILE", str(self.file))
        monkeypatch.setattr(self.m, "_has_bridge", lambda b: b in self.bridges)
        monkeypatch.setattr(
            self.m, "_bridge_ipv4", lambda b: ipaddress.ip_interface(self.bridges[b]) if self.bridges.get(b) else None
        )

        def start():
            self.lxc_net_started += 1
            self.bridges["lxcbr0"] = "10.0.3.1/24"  # lxc-net's default
            return 0, "", ""

        monkeypatch.setattr(self.m, "_start_lxc_net", start)

    def prepare(self, **params):
        return self.m._network({"step": "network", **params})

    def written(self):
        import json

        return json.loads(self.file.read_text()) if self.file.exists() else None


LAB_NET = {"bridge": "lxcbr0", "subnet": "10.77.71.0/24", "range": [100, 250], "gateway": None}


def test_the_agent_writes_the_given_network_on_a_bridge_without_an_address(tmp_path, monkeypatch):
    host = FakeNetHost(load_agent(), tmp_path, monkeypatch, {"lxcbr0": None})
    assert host.prepare(network=LAB_NET) == LAB_NET == host.written()
    assert host.lxc_net_started == 0


def test_without_a_network_the_agent_keeps_the_description_there_or_takes_the_bridges_own(tmp_path, monkeypatch):
    host = FakeNetHost(load_agent(), tmp_path, monkeypatch, {"br0": "192.168.5.1/24", "lxcbr0": None})
    host.file.parent.mkdir()
    host.file.write_text('{"subnet": "10.77.71.0/24", "bridge": "lxcbr0", "range": [120, 130]}')
    assert host.prepare(bridge="lxcbr0")["range"] == [120, 130]  # kept
    host.file.unlink()
    assert host.prepare(bridge="br0") == {
        "bridge": "br0",
        "subnet": "192.168.5.0/24",
        "range": [100, 250],
        "gateway": "192.168.5.1",
    }


def test_a_missing_lxcbr0_is_made_by_lxc_net_only_when_no_network_was_given(tmp_path, monkeypatch):
    agent = load_agent()
    host = FakeNetHost(agent, tmp_path, monkeypatch, {})
    with pytest.raises(agent.AgentError, match="This host has no bridge lxcbr0: create it"):
        host.prepare(network=LAB_NET)
    assert host.written() is None and host.lxc_net_started == 0
    with pytest.raises(agent.AgentError, match="no bridge br9"):
        host.prepare(bridge="br9")
    assert host.prepare(bridge="lxcbr0")["subnet"] == "10.0.3.0/24" and host.lxc_net_started == 1


def test_a_given_network_outside_the_bridges_own_address_or_a_broken_description_is_refused(tmp_path, monkeypatch):
    agent = load_agent()
    host = FakeNetHost(agent, tmp_path, monkeypatch, {"lxcbr0": "10.0.3.1/24"})
    with pytest.raises(agent.AgentError, match="has the address 10.0.3.1, outside the container network 10.77.71.0/24"):
        host.prepare(network=LAB_NET)
    assert host.written() is None
    host.file.parent.mkdir()
    host.file.write_text('{"subnet": "10.0.3.0/24", "bridge": "lxcbr0; reboot"}')
    with pytest.raises(agent.AgentError, match="is not a valid description"):
        host.prepare(bridge="lxcbr0")


def test_a_package_the_hosts_apt_sources_lack_is_named_with_what_to_enable(db, trusted_host, fake_host):
    fake_host(
        {
            "facts": facts("ubuntu", "24.04", "6.8.0-87-generic"),
            "packages": ssh.AgentFailed(
                "apt-get install failed on this host (exit status 100): E: Unable to locate package criu",
                "Reading package lists...\nE: Unable to locate package criu",
            ),
        }
    )
    status, op = _run(trusted_host)
    assert status == "failure"
    assert op.error.startswith("criu is not in h1's apt sources: on Ubuntu 24.04 it is in the universe component")
