"""Which frozen pass a snapshot's rootfs copy took (the agent's stats.frozen_pass: the change
journal with how many paths, or the whole walk and why) is shown with its snapshot on the
container page and given by the API (the journal itself: tests/agent/test_snapshot_journal.py,
on the lab: tests/lab/test_snapshot_journal.py)."""

from django.test import Client

from containers.models import Container, Snapshot


def test_the_container_page_and_the_api_say_which_frozen_pass_each_snapshot_took(users, tokens, trusted_host):
    c = Container.objects.create(name="c1", host=trusted_host, state="RUNNING")
    Snapshot.objects.create(
        container=c, name="s1", stateful=True,
        stats={"frozen_time": 9000, "frozen_pass": "journal", "frozen_pass_paths": 7},
    )  # fmt: skip
    Snapshot.objects.create(
        container=c, name="s2", stateful=True,
        stats={"frozen_time": 9000, "frozen_pass": "walk", "frozen_pass_reason": "the kernel's event queue overflowed"},
    )  # fmt: skip
    web = Client()
    web.force_login(users["carol"])
    page = web.get("/containers/c1/").content.decode()
    assert "rootfs from the change journal: 7 paths" in page
    assert "rootfs walked whole: the kernel&#x27;s event queue overflowed" in page
    rows = Client().get("/api/v1/containers/c1/snapshots/", HTTP_AUTHORIZATION=f"Token {tokens['carol']}").json()
    rows = rows["results"] if isinstance(rows, dict) else rows
    assert {r["name"]: r["stats"].get("frozen_pass") for r in rows} == {"s1": "journal", "s2": "walk"}
