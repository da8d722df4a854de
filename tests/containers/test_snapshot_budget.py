"""The snapshot budget per host (fleet setting snapshot_budget_mib): admins set it, it reaches
the host's agent with every snapshot, and the agent refuses a snapshot that would go past it,
with the numbers, before it freezes anything (the refusal itself for real on the lab:
tests/lab/test_snapshot_store.py::test_a_snapshot_past_the_budget_is_refused_before_anything_is_frozen).
What a snapshot stores is recorded."""

import pytest
from django.test import Client
from django.utils import timezone

from containers import handlers, recovery
from containers.models import Container, Snapshot, SnapshotSchedule
from core.models import AuditEntry, FleetSettings
from operations.models import Operation
from operations.runner import OperationContext
from tests.support.agent_loader import load_agent

URL = "/api/v1/settings/"


def patch(tokens, who, body):
    return Client().patch(URL, body, content_type="application/json", HTTP_AUTHORIZATION=f"Token {tokens[who]}")


def test_an_admin_sets_the_budget_and_it_is_audited(tokens):
    assert Client().get(URL, HTTP_AUTHORIZATION=f"Token {tokens['carol']}").json()["snapshot_budget_mib"] == 0
    r = patch(tokens, "alice", {"snapshot_budget_mib": 2048})
    assert r.status_code == 200, r.content
    assert r.json()["snapshot_budget_mib"] == 2048
    assert FleetSettings.load().snapshot_budget_mib == 2048
    assert AuditEntry.objects.get(action="settings.update").detail == "none MiB -> 2048 MiB"
    assert patch(tokens, "bob", {"snapshot_budget_mib": 1}).status_code == 403


@pytest.mark.parametrize("value", [-1, "lots", 1.5, True, None, 1 << 31])
def test_a_bad_budget_is_refused_and_changes_nothing(tokens, value):
    r = patch(tokens, "alice", {"snapshot_budget_mib": value})
    assert r.status_code == 400, r.content
    assert r.json()["field"] == "snapshot_budget_mib"
    assert "whole number of MiB" in r.json()["error"]
    assert FleetSettings.load().snapshot_budget_mib == 0


@pytest.fixture
def snapshotting(db, trusted_host, monkeypatch):
    c = Container.objects.create(name="c1", host=trusted_host, state="RUNNING")
    op = Operation.objects.create(
        kind="snapshot", status="running", container=c, container_name="c1", host=trusted_host,
        params={"snapshot": "s1", "stateful": True},
    )  # fmt: skip
    sent = []

    def agent_or_wait(ctx, host, sub, params, *a, **kw):
        sent.append((sub, params))
        return {
            "snapshot": "s1", "stateful": True, "size_bytes": 200 << 20, "added_bytes": 3 << 20,
            "images_bytes": 5 << 20, "images_raw_bytes": 40 << 20, "images_compression": "zstd", "stats": {},
        }  # fmt: skip

    monkeypatch.setattr(handlers, "agent_or_wait", agent_or_wait)
    return c, op, sent


def test_the_budget_goes_to_the_agent_and_the_stored_sizes_are_recorded(snapshotting):
    c, op, sent = snapshotting
    fs = FleetSettings.load()
    fs.snapshot_budget_mib = 1024
    fs.save()
    handlers.snapshot(OperationContext(op))
    assert sent == [("snapshot", {"name": "c1", "snapshot": "s1", "stateful": True, "budget_bytes": 1 << 30})]
    s = Snapshot.objects.get(container=c, name="s1")
    assert (s.size_bytes, s.added_bytes, s.images_bytes, s.images_raw_bytes, s.images_compression) == (
        200 << 20, 3 << 20, 5 << 20, 40 << 20, "zstd"
    )  # fmt: skip


def test_without_a_budget_none_is_sent(snapshotting):
    c, op, sent = snapshotting
    handlers.snapshot(OperationContext(op))
    assert "budget_bytes" not in sent[0][1]


def test_the_agent_refuses_past_the_budget_with_the_numbers(tmp_path):
    agent = load_agent(root=tmp_path)
    other = tmp_path / "ctweb/snapshots/other/old/rootfs"
    other.mkdir(parents=True)
    (other / "big").write_bytes(b"x" * (3 << 20))
    used = agent.store.du_once([agent.S.SNAPSHOTS_PATH])
    assert used >= 3 << 20
    assert agent.criu._check_budget("c1", "s2", used + (2 << 20), 1 << 20, 1 << 20) == used  # fits exactly
    with pytest.raises(agent.AgentError) as e:
        agent.criu._check_budget("c1", "s2", 4 << 20, 1 << 20, 1 << 20)
    assert "over the host's snapshot budget of 4 MiB" in e.value.message
    assert "would add about 2 MiB" in e.value.message and "Nothing was frozen" in e.value.message
    assert e.value.data["used_bytes"] == used and e.value.data["estimate_bytes"] == 2 << 20
    assert e.value.data["budget_bytes"] == 4 << 20


def test_the_snapshot_page_and_the_api_show_the_stored_sizes(users, tokens, trusted_host):
    c = Container.objects.create(name="c1", host=trusted_host, state="RUNNING")
    Snapshot.objects.create(
        container=c, name="s1", stateful=True, size_bytes=200 << 20, added_bytes=3 << 20,
        images_bytes=5 << 20, images_raw_bytes=40 << 20, images_compression="zstd",
    )  # fmt: skip
    web = Client()
    web.force_login(users["carol"])
    page = web.get("/containers/c1/snapshots/s1/").content.decode()
    assert "3.0\xa0MB added when taken" in page and "5.0\xa0MB stored (zstd; 40.0\xa0MB uncompressed)" in page
    row = Client().get("/api/v1/containers/c1/snapshots/", HTTP_AUTHORIZATION=f"Token {tokens['carol']}").json()
    row = row["results"][0] if isinstance(row, dict) else row[0]
    assert (row["added_bytes"], row["images_bytes"], row["images_raw_bytes"], row["images_compression"]) == (
        3 << 20, 5 << 20, 40 << 20, "zstd"
    )  # fmt: skip


def test_the_host_page_shows_how_snapshots_are_kept_and_the_budget(users, trusted_host):
    trusted_host.capabilities = {
        "kernel": "6.18",
        "snapshot_storage": {
            "filesystem": "ext2/ext3", "sharing": "hardlink", "reflink": False, "native_cow": None,
            "native_cow_used": False, "overlayfs": True, "zstd": "zstd 1.5.7", "used_bytes": 300 << 20,
        },
    }  # fmt: skip
    trusted_host.save()
    fs = FleetSettings.load()
    fs.snapshot_budget_mib = 1024
    fs.save()
    web = Client()
    web.force_login(users["carol"])
    page = web.get(f"/hosts/{trusted_host.name}/").content.decode()
    assert "share unchanged files with the previous snapshot (hard links)" in page
    assert "compressed with zstd" in page and "native copy-on-write: none" in page
    assert "300.0\xa0MB used of a budget of 1.0\xa0GB" in page


def test_the_host_page_says_whether_btrfs_snapshots_are_used_and_why_not(users, trusted_host):
    storage = {
        "filesystem": "btrfs", "sharing": "hardlink", "reflink": True, "native_cow": "btrfs subvolumes",
        "native_cow_used": True, "native_cow_not_used_because": None, "zstd": "zstd 1.5.7", "used_bytes": 8 << 20,
    }  # fmt: skip
    trusted_host.capabilities = {"kernel": "6.18", "snapshot_storage": storage}
    trusted_host.save()
    web = Client()
    web.force_login(users["carol"])
    page = web.get(f"/hosts/{trusted_host.name}/").content.decode()
    assert "native copy-on-write: btrfs subvolumes available, used" in page
    assert "read-only btrfs snapshot of the container" in page
    storage.update(native_cow_used=False, native_cow_not_used_because="the container rootfs directory is not on btrfs")
    trusted_host.capabilities = {"kernel": "6.18", "snapshot_storage": storage}
    trusted_host.save()
    page = web.get(f"/hosts/{trusted_host.name}/").content.decode()
    assert "btrfs subvolumes available, not used (the container rootfs directory is not on btrfs)" in page
    assert "share unchanged files with the previous snapshot (hard links)" in page


def test_an_admin_sets_the_budget_on_the_settings_page(users):
    web = Client()
    web.force_login(users["alice"])
    assert web.post("/settings/", {"snapshot_budget_mib": "512"}).status_code == 302
    assert FleetSettings.load().snapshot_budget_mib == 512
    assert "Now: 512 MiB per host" in web.get("/settings/").content.decode()
    assert web.post("/settings/", {"snapshot_budget_mib": "-5"}).status_code == 400
    assert FleetSettings.load().snapshot_budget_mib == 512
    bob = Client()
    bob.force_login(users["bob"])
    assert bob.post("/settings/", {"snapshot_budget_mib": "1"}).status_code == 403
    assert FleetSettings.load().snapshot_budget_mib == 512


def test_a_recovered_snapshot_keeps_its_stored_sizes_and_schedule(trusted_host, monkeypatch):
    c = Container.objects.create(name="c1", host=trusted_host, state="RUNNING")
    sched = SnapshotSchedule.objects.create(container=c, every=1, unit="hours", next_run_at=timezone.now())
    op = Operation.objects.create(
        kind="snapshot", status="running", container=c, container_name="c1", host=trusted_host,
        params={"snapshot": "s1", "stateful": False, "schedule": sched.pk},
    )  # fmt: skip
    meta = {"stateful": False, "size_bytes": 9 << 20, "added_bytes": 1 << 20, "stats": {}}

    def agent_or_wait(ctx, host, sub, params, *a, **kw):
        assert sub == "inspect"
        return {"exists": True, "state": "RUNNING", "snapshot": meta}

    monkeypatch.setattr(recovery, "agent_or_wait", agent_or_wait)
    recovery.recover_snapshot(OperationContext(op))
    s = Snapshot.objects.get(container=c, name="s1")
    assert (s.size_bytes, s.added_bytes, s.schedule) == (9 << 20, 1 << 20, sched)
