"""The operation page's phase list and downtime breakdown, computed from the stored row."""

from datetime import datetime

from operations.display import downtime_breakdown, phase_spans


def _ev(at: str, phase: str) -> dict:
    return {"at": f"2026-11-26T03:00:{at}+00:00", "phase": phase, "message": ""}


def test_consecutive_events_of_a_phase_make_one_span_that_lasts_until_the_next():
    events = [_ev("00.000", "connect"), _ev("00.500", "dump"), _ev("01.000", "dump"), _ev("02.250", "success")]
    spans = phase_spans(events, datetime.fromisoformat("2026-11-26T03:00:02.250+00:00"))
    assert [(s["phase"], s["ms"]) for s in spans] == [("connect", 500.0), ("dump", 1750.0), ("success", None)]


def test_a_running_operation_has_no_length_for_its_current_phase():
    spans = phase_spans([_ev("00.000", "connect"), _ev("01.000", "transfer")], None)
    assert [(s["phase"], s["ms"]) for s in spans] == [("connect", 1000.0), ("transfer", None)]


def test_the_downtime_splits_into_freeze_dump_transfer_and_restore():
    result = {
        "strategy": "stop-and-copy",
        "downtime_ms": 1000.0,
        "phases": {"preflight_ms": 400, "presync_ms": 600, "dump_ms": 300, "transfer_ms": 400, "restore_ms": 300},
        "dump_stats": {"freezing_time": 100000},  # µs
    }
    b = downtime_breakdown(result)
    assert [(s["key"], s["ms"]) for s in b["segments"]] == [
        ("freeze", 100.0),
        ("dump", 200.0),
        ("transfer", 400.0),
        ("restore", 300.0),
    ]
    assert [s["share"] for s in b["segments"]] == [10.0, 20.0, 40.0, 30.0]
    assert b["segments"][-1]["x"] + b["segments"][-1]["width"] == 1000  # the bar is full


def test_a_cold_move_is_stop_transfer_start_and_no_downtime_means_no_breakdown():
    cold = {
        "strategy": "restart",
        "downtime_ms": 500,
        "phases": {"dump_ms": 100, "transfer_ms": 300, "restore_ms": 100},
    }
    assert [s["label"] for s in downtime_breakdown(cold)["segments"]][0::2] == ["stop", "start"]
    assert downtime_breakdown({"strategy": "restart", "downtime_ms": 0, "phases": {"dump_ms": 1}}) is None
    assert downtime_breakdown({}) is None
