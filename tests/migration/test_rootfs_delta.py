"""What a migration's result says of its rootfs delta, the copy made while the container is
down (containers/migration/transfer.py rootfs_delta): which pass listed it, from the source's
change journal or a walk of the whole tree and why, passed on by the target (a host may lie:
only well-typed values are kept), and the operation page shows it."""

from django.test import Client

from containers.migration.transfer import rootfs_delta
from containers.models import Container
from hosts.models import Host
from operations.models import Operation
from tests.support.helpers import users  # noqa: F401  (fixture)


def test_the_journal_or_the_walk_and_why():
    got = rootfs_delta(
        {"files": 3, "delta": {"frozen_pass": "journal", "frozen_pass_paths": 12, "list_ms": 4.5}}, 81.26
    )
    assert got["pass"] == "journal" and got["paths"] == 12 and got["list_ms"] == 4.5 and got["ms"] == 81.3
    assert "change journal: 12 paths" in got["sentence"]
    walk = rootfs_delta(
        {"delta": {"frozen_pass": "walk", "frozen_pass_reason": "the kernel's event queue overflowed"}}, 900
    )
    assert walk["pass"] == "walk" and "overflowed" in walk["sentence"]


def test_what_a_lying_or_older_target_says_is_dropped():
    for said in (
        None,
        {},
        {"delta": "x"},
        {"delta": {"frozen_pass": "fast", "frozen_pass_paths": True, "list_ms": "1"}},
    ):
        got = rootfs_delta(said, 10)
        assert got["pass"] is None and got["paths"] is None and got["list_ms"] is None
        assert "did not say" in got["sentence"]
    long = rootfs_delta({"delta": {"frozen_pass": "walk", "frozen_pass_reason": "x" * 5000}}, 1)
    assert len(long["reason"]) == 500


def test_the_operation_page_shows_which_pass_listed_the_delta(users):  # noqa: F811
    host = Host.objects.create(name="h1", address="127.0.0.1", port=1, status="online")
    box = Container.objects.create(name="box", host=host, state="RUNNING")
    result = {
        "strategy": "stop-and-copy",
        "downtime_ms": 1000.0,
        "total_ms": 4000.0,
        "phases": {"dump_ms": 500},
        "rootfs_delta": rootfs_delta({"delta": {"frozen_pass": "walk", "frozen_pass_reason": "no journal ran"}}, 77),
    }
    op = Operation.objects.create(
        kind="migrate", container=box, container_name="box", host=host, status="success", result=result
    )
    c = Client()
    c.force_login(users["carol"])
    html = c.get(f"/operations/{op.pk}/").content.decode()
    assert 'id="rootfs-delta"' in html and "77 ms, from a walk of the whole rootfs (no journal ran)" in html
