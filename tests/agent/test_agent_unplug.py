"""Before a dump that stops a container, the agent takes the host ends of its veths out of
their bridges, so no client segment reaches its network namespace once the processes are gone
(the source answered one with an RST on the lab: docs/LAB-NOTES.md). A dump that fails with
the container still running puts them back. LXC's and the kernel's answers are a table here
(/sys/class/net in a temporary directory); the lab case is
tests/migration/test_e2e_lab_client_rst.py."""

import os

import pytest

LXC_INFO = "Name: c1\nState: RUNNING\nLink: vethA1\n TX bytes: 10\nLink: vethB2\nLink: bad;name\n"


@pytest.fixture
def host(agent, monkeypatch, tmp_path):
    net = tmp_path / "sys-class-net"
    for veth in ("vethA1", "vethB2"):
        (net / veth).mkdir(parents=True)
    os.symlink("../lxcbr0", net / "vethA1" / "master")  # vethB2 is on no bridge
    ran = []
    said = {"state": "RUNNING", "dump_rc": 0}

    def run(argv, timeout=120, check=False, input=None):
        ran.append(argv)
        return (0, LXC_INFO, "") if argv[0] == "lxc-info" else (0, "", "")

    def lxc_checkpoint(name, images, mode, env=None):
        ran.append(["lxc-checkpoint", mode])
        if said["dump_rc"] == 0:
            said["state"] = "STOPPED"
            (net / "vethA1" / "master").unlink()
            os.rmdir(net / "vethA1")  # LXC deletes the veth of a stopped container
            open(os.path.join(images, "inventory.img"), "w").close()
        return said["dump_rc"], "Dumping FAILED" if said["dump_rc"] else ""

    monkeypatch.setattr(agent.criu, "SYS_NET", str(net))
    monkeypatch.setattr(agent.criu, "run", run)
    monkeypatch.setattr(agent.criu, "_lxc_checkpoint", lxc_checkpoint)
    monkeypatch.setattr(agent.criu, "_state", lambda name: said["state"])
    monkeypatch.setattr(agent.criu, "_criu_log", lambda images, which: "")
    monkeypatch.setattr(agent.criu, "_has_saved_state", lambda name: False)
    return ran, said


def test_the_bridged_veth_leaves_its_bridge_before_the_dump_and_stays_out(agent, host, tmp_path):
    ran, _ = host
    agent.criu._criu_dump("c1", str(tmp_path), stop=True)
    assert ran == [
        ["lxc-info", "-n", "c1", "-H"],
        ["ip", "link", "set", "dev", "vethA1", "nomaster"],
        ["lxc-checkpoint", "stop"],
    ]


def test_a_failed_dump_puts_the_veth_back_into_its_bridge(agent, host, tmp_path):
    ran, said = host
    said["dump_rc"] = 1
    with pytest.raises(agent.AgentError):
        agent.criu._criu_dump("c1", str(tmp_path), stop=True)
    assert ran[-2:] == [["lxc-checkpoint", "stop"], ["ip", "link", "set", "dev", "vethA1", "master", "lxcbr0"]]


def test_a_dump_that_leaves_the_container_running_unplugs_nothing(agent, host, tmp_path):
    ran, _ = host
    agent.criu._criu_dump("c1", str(tmp_path), stop=False)
    assert ran == [["lxc-checkpoint", "dump"]]


def test_tasks_that_run_on_here_get_their_veths_back_from_the_config(agent, host, tmp_path, monkeypatch):
    # A post-copy resumed on its source, or a dump whose agent died after unplugging: what is
    # in no bridge goes back into the bridge the container's config names; nothing else moves.
    ran, _ = host
    (tmp_path / "sys-class-net" / "lxcbr0" / "bridge").mkdir(parents=True)
    monkeypatch.setattr(agent.criu, "_read_config", lambda name: ["lxc.net.0.link = lxcbr0\n"])
    assert agent.criu._replug_config("c1") == ["vethB2"]
    assert ran == [["lxc-info", "-n", "c1", "-H"], ["ip", "link", "set", "dev", "vethB2", "master", "lxcbr0"]]
    for config in (["lxc.net.0.link = nosuchbr\n"], ["lxc.net.0.link = bad;br\n"], []):
        ran.clear()
        monkeypatch.setattr(agent.criu, "_read_config", lambda name, c=config: c)
        assert agent.criu._replug_config("c1") == [] and ran == []
