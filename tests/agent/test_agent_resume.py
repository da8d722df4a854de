"""`migrate-resume` on a source whose tasks no dump ever took: the link to it broke before the
dump began (or CRIU rolled a failed dump back), so the container is still running, or still
frozen, there. The resume says so and changes nothing but a thaw; a restore would be refused
by LXC ("is running, not restoring") and the dashboard would record the container STOPPED
while it ran: the fault matrix's [post-copy-link-source-45s-dump] counted it lost that way.
LXC's answers are a table here (the agent's logic); the lab case is that matrix row."""

import pytest


@pytest.fixture
def source(agent, monkeypatch):
    said = {"state": "RUNNING", "freezer": "THAWED", "thawed": 0}

    def thaw(name):
        said["thawed"] += 1
        said["state"], said["freezer"] = "RUNNING", "THAWED"

    def restore(*a, **kw):
        raise AssertionError("no restore may be tried over tasks that run")

    monkeypatch.setattr(agent.lazy, "_require", lambda name: name)  # a container c1 exists
    monkeypatch.setattr(agent.lazy, "_state", lambda name: said["state"])
    monkeypatch.setattr(agent.lazy, "_freezer_state", lambda name: said["freezer"], raising=False)
    monkeypatch.setattr(agent.lazy, "_thaw", thaw)
    monkeypatch.setattr(agent.lazy, "_criu_restore", restore)
    return said


def test_a_container_no_dump_took_is_found_running_not_restored(agent, source):
    out = agent.cmd_migrate_resume({"name": "c1", "migration": 5})
    assert out["state"] == "RUNNING" and "never stopped" in out["resumed"]
    assert source["thawed"] == 0


@pytest.mark.parametrize("state", ["FROZEN", "RUNNING"])  # LXC may say RUNNING over frozen tasks
def test_a_container_a_cut_off_dump_left_frozen_is_thawed(agent, source, state):
    source.update(state=state, freezer="FROZEN")
    out = agent.cmd_migrate_resume({"name": "c1", "migration": 5})
    assert out["state"] == "RUNNING" and source["thawed"] == 1


def test_a_stopped_container_is_still_restored_from_its_dump(agent, source, monkeypatch):
    source.update(state="STOPPED", freezer=None)
    tried = []
    monkeypatch.setattr(agent.lazy, "_criu_restore", lambda name, images, *a, **kw: tried.append(images))
    monkeypatch.setattr(agent.lazy, "_criu_stats", lambda images, which: {})
    agent.cmd_migrate_resume({"name": "c1", "migration": 5})
    assert tried and tried[0].endswith("/5/images")
