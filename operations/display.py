"""What the operation page shows beside the raw record: its phases in order, and for a
migration where the downtime went. Pure functions of the row, so the page and its tests agree."""

from __future__ import annotations

from datetime import datetime

# The colours match the legend's swatches in ctweb.css.
END_PHASES = ("success", "failure", "cancelled")
SEGMENT_COLOURS = {"freeze": "#8250df", "dump": "#1f5fbf", "transfer": "#bf8700", "restore": "#1a7f37"}


def _at(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


def phase_spans(events: list[dict], finished_at: datetime | None = None) -> list[dict]:
    """Consecutive events of one phase become one span: its name, start and length (ms).

    The last span of a running operation has no length yet."""
    spans: list[dict] = []
    for e in events or []:
        at = _at(e.get("at"))
        if at is None:
            continue
        if spans and spans[-1]["phase"] == e.get("phase"):
            continue
        spans.append({"phase": e.get("phase") or "", "start": at, "ms": None})
    for i, span in enumerate(spans):
        end = spans[i + 1]["start"] if i + 1 < len(spans) else finished_at
        if span["phase"] in END_PHASES:
            continue  # where it ended, not a phase that took time
        if end is not None:
            span["ms"] = round((end - span["start"]).total_seconds() * 1000, 1)
    return spans


def downtime_breakdown(result: dict) -> dict | None:
    """Where a migration's downtime went: freeze, dump, transfer, restore (ms each).

    The downtime runs from the moment the source stops (the dump, or a plain stop for a cold
    move) until the target runs the container; the migration's phase clock splits it into
    dump, transfer and restore, and CRIU's own freezing_time says how much of the dump was
    spent freezing the processes."""
    phases = (result or {}).get("phases") or {}
    downtime = (result or {}).get("downtime_ms")
    if not phases or not downtime:
        return None
    cold = result.get("strategy") == "restart"
    dump = float(phases.get("dump_ms") or 0)
    freeze = float((result.get("dump_stats") or {}).get("freezing_time") or 0) / 1000
    segments = []
    if not cold and 0 < freeze < dump:
        segments.append({"key": "freeze", "label": "freeze (CRIU freezing the processes)", "ms": round(freeze, 1)})
        dump -= freeze
    segments.append({"key": "dump", "label": "stop" if cold else "dump (CRIU writing memory images)", "ms": dump})
    segments.append(
        {"key": "transfer", "label": "transfer (rootfs changes and memory images)", "ms": phases.get("transfer_ms")}
    )
    segments.append(
        {"key": "restore", "label": "start" if cold else "restore (CRIU on the target)", "ms": phases.get("restore_ms")}
    )
    segments = [s for s in segments if s["ms"]]
    total = sum(float(s["ms"]) for s in segments) or 1.0
    x = 0.0
    for s in segments:
        s["ms"] = round(float(s["ms"]), 1)
        s["share"] = round(100 * s["ms"] / total, 1)
        s["x"] = round(x, 2)
        s["width"] = round(1000 * s["ms"] / total, 2)
        s["colour"] = SEGMENT_COLOURS[s["key"]]
        x += s["width"]
    seen = result.get("client_downtime") if isinstance(result.get("client_downtime"), dict) else {}
    return {
        "downtime_ms": downtime,
        "segments": segments,
        "sum_ms": round(total, 1),
        # Beside CRIU's parts: what a client saw, measured outside the container's processes.
        "client": {
            "ms": result.get("client_downtime_ms"),
            "from": seen.get("from"),
            "until": seen.get("until"),
            "why": seen.get("why"),
            "note": seen.get("note"),
        },
    }


def predicted_vs_actual(result: dict) -> list[dict]:
    """A migration's prediction beside what it measured: [{what, predicted_ms, actual_ms,
    error_pct}] for the downtime and the whole operation; [] without a prediction."""
    result = result or {}
    made = result.get("prediction")
    if not isinstance(made, dict):
        return []
    rows = []
    for what, predicted, actual in (
        ("downtime", made.get("predicted_downtime_ms"), result.get("downtime_ms")),
        ("whole operation", made.get("predicted_total_ms"), result.get("total_ms")),
    ):
        if not isinstance(predicted, int | float):
            continue
        row = {"what": what, "predicted_ms": round(predicted), "actual_ms": None, "error_pct": None}
        if isinstance(actual, int | float) and actual > 0:
            row["actual_ms"] = round(actual)
            row["error_pct"] = round((predicted - actual) / actual * 100)
        rows.append(row)
    return rows
