"""A migration's client-visible downtime: the source's freeze and the target's first answer,
each reported by its agent as "N ms before my result line", placed on the worker's clock by
when each line arrived (containers/migration/downtime.py client_downtime). No host clock is compared."""

import pytest

from containers.migration.downtime import client_downtime, dump_began, served_wait_s
from operations.display import downtime_breakdown


def test_it_runs_from_the_freeze_to_the_first_answer_on_the_workers_clock():
    # The dump's line arrived at 100.0 s (worker), 250 ms after the freeze; the restore's at
    # 101.0 s, 40 ms after the first answer: the container was gone 1210 ms.
    dumped = {"frozen": {"ago_ms": 250.0, "how": "freezer"}}
    restored = {"answered": {"ago_ms": 40.0, "address": "10.77.64.100"}}
    seen = client_downtime(dumped, 100.0, restored, 101.0, "lab-a", "lab-b")
    assert seen["ms"] == 1210.0
    assert "freezer cgroup on lab-a" in seen["from"]
    assert seen["until"] == "its address 10.77.64.100 answered ICMP echo on lab-b"


def test_a_freeze_not_seen_in_the_cgroup_counts_from_the_dumps_start_and_says_so():
    seen = client_downtime(
        {"frozen": {"ago_ms": 300, "how": "dump-start"}}, 50.0, {"answered": {"ago_ms": 0}}, 50.5, "a", "b"
    )
    assert seen["ms"] == 800.0 and "upper bound" in seen["from"]


def test_no_answer_or_a_lying_agent_gives_no_number_and_a_reason():
    frozen = {"frozen": {"ago_ms": 10, "how": "freezer"}}
    why = {"answered": {"ago_ms": None, "why": "it has no IPv4 address in its config"}}
    seen = client_downtime(frozen, 1.0, why, 2.0, "a", "b")
    assert seen["ms"] is None and "no IPv4 address" in seen["why"]
    for lie in ("12", True, -5, 1e12, None, [1]):
        assert (
            client_downtime({"frozen": {"ago_ms": lie, "how": "freezer"}}, 1, {"answered": {"ago_ms": 1}}, 2, "a", "b")[
                "ms"
            ]
            is None
        )
        assert client_downtime(frozen, 1, {"answered": {"ago_ms": lie}}, 2, "a", "b")["ms"] is None
    assert (
        client_downtime({"frozen": {"ago_ms": 1, "how": "guess"}}, 1, {"answered": {"ago_ms": 1}}, 2, "a", "b")["ms"]
        is None
    )
    assert client_downtime({}, 1, {}, 2, "a", "b")["why"]


def test_the_operation_page_shows_it_beside_the_criu_breakdown():
    result = {
        "strategy": "stop-and-copy",
        "downtime_ms": 900.0,
        "client_downtime_ms": 950.5,
        "client_downtime": {"ms": 950.5, "from": "x", "until": "y"},
        "phases": {"dump_ms": 300, "transfer_ms": 300, "restore_ms": 300},
    }
    assert downtime_breakdown(result)["client"] == {"ms": 950.5, "from": "x", "until": "y", "why": None, "note": None}


def test_it_ends_when_its_processes_sent_new_tcp_data_not_when_the_kernel_answered_icmp():
    # Post-copy: its address answered ICMP 700 ms before the restore's line arrived, its
    # processes first sent new data 10 ms before it (they had to fetch their memory first).
    dumped = {"frozen": {"ago_ms": 250.0, "how": "freezer"}}
    restored = {"answered": {"ago_ms": 700.0, "address": "10.77.64.100", "served_ago_ms": 10.0, "connections": 200}}
    seen = client_downtime(dumped, 100.0, restored, 101.0, "lab-a", "lab-b")
    assert seen["ms"] == 1240.0 and seen["answered_ms"] == 550.0
    assert seen["until"].startswith("its processes sent new TCP data on lab-b (it held 200 established connections)")
    assert "answered ICMP echo 690.0 ms before" in seen["until"]


def test_a_serving_instant_before_the_answer_or_a_lie_falls_back_to_the_answer():
    dumped = {"frozen": {"ago_ms": 250.0, "how": "freezer"}}
    for lie in (800.0, -1, "5", True, 1e12):  # before the answer, or not a number
        restored = {"answered": {"ago_ms": 40.0, "served_ago_ms": lie, "connections": 1}}
        seen = client_downtime(dumped, 100.0, restored, 101.0, "lab-a", "lab-b")
        assert seen["ms"] == 1210.0 and "answered ICMP echo" in seen["until"], lie
    restored = {"answered": {"ago_ms": 40.0, "served_why": "it held no established TCP connection"}}
    seen = client_downtime(dumped, 100.0, restored, 101.0, "lab-a", "lab-b")
    assert seen["ms"] == 1210.0 and seen["served_why"] == "it held no established TCP connection"


def test_the_wait_for_new_data_is_not_counted_as_the_workers_downtime_and_is_bounded():
    assert served_wait_s({"answered": {"served_wait_ms": 1500.0}}) == 1.5
    assert served_wait_s({"answered": {"served_wait_ms": 9e6}}) == 5.0  # a host's lie costs at most 5 s
    for nothing in (
        {},
        {"answered": None},
        {"answered": {"served_wait_ms": "1"}},
        {"answered": {"served_wait_ms": -3}},
    ):
        assert served_wait_s(nothing) == 0.0


def test_the_downtime_starts_when_the_dump_began_on_the_source_never_outside_the_call():
    """From the agent's "began so many ms before my result line", placed on this worker's clock;
    a host's number outside the call's own span (or none, or not a number) is not believed."""
    asked, answered = 100.0, 101.5  # this worker's clock: the call went out, its result came in
    assert dump_began({"frozen": {"started_ago_ms": 1200}}, answered, asked) == pytest.approx(100.3)
    assert dump_began({"frozen": {"started_ago_ms": 90_000}}, answered, asked) == asked  # before it was asked
    assert dump_began({"frozen": {"started_ago_ms": 0}}, answered, asked) == answered
    for lie in ({"frozen": {"started_ago_ms": -5}}, {"frozen": {"started_ago_ms": "1"}}, {"frozen": 3}, {}):
        assert dump_began(lie, answered, asked) == asked


def test_a_dump_that_saw_no_freeze_says_why():
    """The freeze watch's reason (no cgroup, no freezer file, an unreadable one) reaches the result."""
    dumped = {"frozen": {"ago_ms": 900.0, "how": "dump-start", "why": "its cgroup was not found"}}
    seen = client_downtime(dumped, 100.0, {}, 101.0, "lab-a", "lab-b")
    assert "no freezer cgroup seen" in seen["from"] and seen["from_why"] == "its cgroup was not found"
    frozen = {"frozen": {"ago_ms": 900.0, "how": "freezer", "why": "ignored when a freeze was seen"}}
    assert "from_why" not in client_downtime(frozen, 100.0, {}, 101.0, "lab-a", "lab-b")
