"""Predicted downtime and total time of a migration, per strategy, before it runs.

The model (pure: `predict`) is physical, its constants measured:
- stop-and-copy: downtime = fixed + memory x (CRIU's dump and restore per MiB + 1 / stream rate);
  the fixed part is the freeze, the agents' round trips, the rootfs delta and CRIU's
  non-memory state; total = downtime + the rootfs sent beforehand (rootfs / tree rate) + a
  fixed rest (preflight, cleanup);
- post-copy: downtime = fixed (the dump and restore without the pages: roughly flat in memory),
  total adds the page pull (memory / page rate);
- restart: downtime = fixed (stop + cold start), total adds the rootfs copy like stop-and-copy.

Where the numbers come from (`calibrate`, from the database): past successful migrations of
the same strategy, the same host pair first (either direction), then any pair. With two or
more past sizes far enough apart, fixed and per-MiB are fitted by least squares; with fewer,
the per-MiB cost is the prior's CRIU part plus the measured stream rate and only the fixed part
is taken from the past (the median of what the past left over). Without history: the priors,
measured by bench/run.py's memory section on the lab.

Two rates, because the same path moves a tree of files and a stream of images at very different
speeds (a debian rootfs of 10,000 files pays per file on both hosts, the images do not): the tree
rate is the median of past presyncs (their bytes over their phase's time), the stream rate that
of past transfer phases that moved 64 MiB or more (the images and the delta, container down), on
that host pair first (either way), then on any.

`gather` asks the source's agent (`estimate`, read-only) for the memory, the rootfs size and a
1-second sample of the cgroup's page faults (no soft-dirty tracking here: docs/LAB-NOTES.md).
The sample is reported among the inputs; the model does not use it yet (it would matter for
pre-copy, which this kernel cannot do).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from hosts import ssh
from hosts.models import Host
from operations.models import Operation

from .models import Container

MIB = 1 << 20
LIVE = ("stop-and-copy", "post-copy")
PREDICTED = ("stop-and-copy", "post-copy", "restart")  # pre-copy is never possible yet
HISTORY = 20  # past migrations looked at, per strategy
PATH_SAMPLE_MIN = 64 * MIB  # a migration that moved less says little about the path's rate

# Measured on the lab (2 cores, debian container, python holding memory, relayed over SSH, a quiet
# machine): bench/results/latest.md "downtime against memory size", 2026-12-02 04:35 on main eab802c
# (stop-and-copy 1665 ms at 16 MiB, 2957 at 128, 9365 at 512: least squares 1202 ms + 15.8 ms/MiB,
# of which the images' stream ~7.7 (130 MiB/s, a scratch run's transfer phases: 100-151 MiB/s);
# post-copy 1917-2241 ms, flat; totals: the presync of its 184 MiB rootfs at 25-55 MiB/s (median
# ~30), post-copy's page pull at 53-135 MiB/s with the read-ahead, and what is left (preflight,
# cleanup: ~1 s for stop-and-copy, ~5 s for post-copy, whose pull ends and cleanup take longer).
PRIOR_PATH_MIB_S = 130.0
PRIOR_TREE_MIB_S = 30.0
PRIOR_PAGE_MIB_S = 100.0
PRIORS = {
    "stop-and-copy": {"fixed_ms": 1200.0, "criu_ms_per_mib": 8.1, "rest_ms": 1000.0},
    "post-copy": {"fixed_ms": 2100.0, "criu_ms_per_mib": 0.0, "rest_ms": 5000.0},
    "restart": {"fixed_ms": 1500.0, "criu_ms_per_mib": 0.0, "rest_ms": 1000.0},  # not in the bench: unmeasured
}


@dataclass
class Calibration:
    """One strategy's constants and where they came from."""

    fixed_ms: float
    ms_per_mib: float  # downtime per MiB of memory (0 for post-copy and restart)
    rest_ms: float  # total - downtime - presync - pages, fixed
    source: str  # "prior" | "history (n on lab-a/lab-b)" | "fit (n on ...)"
    samples: int = 0


@dataclass
class Inputs:
    memory_bytes: int | None
    rootfs_bytes: int | None
    path_mib_s: float  # the images' stream, host to host (downtime)
    page_mib_s: float
    path_source: str = "prior"
    tree_mib_s: float = PRIOR_TREE_MIB_S  # the rootfs presync: a tree of files (total)
    tree_source: str = "prior"
    sample: dict | None = None
    calibration: dict[str, Calibration] = field(default_factory=dict)


def predict(strategy: str, inputs: Inputs) -> tuple[float, float] | None:
    """(downtime_ms, total_ms) for one strategy, or None when the memory is unknown."""
    cal = inputs.calibration.get(strategy)
    if cal is None:
        return None
    if strategy in LIVE and inputs.memory_bytes is None:
        return None
    mem = (inputs.memory_bytes or 0) / MIB if strategy in LIVE else 0.0
    down = cal.fixed_ms + mem * cal.ms_per_mib
    presync = (inputs.rootfs_bytes or 0) / MIB * 1000 / max(inputs.tree_mib_s, 1e-3)
    pages = mem * 1000 / max(inputs.page_mib_s, 1e-3) if strategy == "post-copy" else 0.0
    return round(down, 1), round(down + presync + pages + cal.rest_ms, 1)


def _fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares y = a + b x over (x, y), or None when the xs are too close to tell a slope."""
    xs = [x for x, _ in points]
    if len(points) < 2 or max(xs) - min(xs) < 32 or max(xs) < 1.5 * max(min(xs), 1):
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    b = max(b, 0.0)
    return max(my - b * mx, 0.0), b


def calibrate_one(
    strategy: str,
    samples: list[dict],
    path_mib_s: float,
    page_mib_s: float,
    where: str,
    tree_mib_s: float | None = None,
) -> Calibration:
    """One strategy's constants from past results ({memory_mib, rootfs_mib, downtime_ms, total_ms})."""
    tree_mib_s = tree_mib_s or PRIOR_TREE_MIB_S
    prior = PRIORS[strategy]
    slope = prior["criu_ms_per_mib"] + (1000 / path_mib_s if strategy == "stop-and-copy" else 0.0)
    if not samples:
        return Calibration(prior["fixed_ms"], slope, prior["rest_ms"], "prior")
    fitted = _fit([(s["memory_mib"], s["downtime_ms"]) for s in samples]) if strategy == "stop-and-copy" else None
    if fitted:
        fixed, slope = fitted
        how = "fit"
    else:
        fixed = statistics.median(s["downtime_ms"] - slope * s["memory_mib"] for s in samples)
        how = "history"
    if strategy not in LIVE:
        slope = 0.0
    rest = statistics.median(
        s["total_ms"]
        - s["downtime_ms"]
        - s["rootfs_mib"] * 1000 / tree_mib_s
        - (s["memory_mib"] * 1000 / page_mib_s if strategy == "post-copy" else 0.0)
        for s in samples
    )
    return Calibration(round(fixed, 1), round(slope, 3), round(max(rest, 0.0), 1), f"{how} ({len(samples)} {where})")


def sample_of(result: dict) -> dict | None:
    """What one past migration's result says for calibration, or None when it cannot tell."""
    try:
        down, total = float(result["downtime_ms"]), float(result["total_ms"])
    except (KeyError, TypeError, ValueError):
        return None
    inputs = (result.get("prediction") or {}).get("inputs") or {}
    mem = inputs.get("memory_bytes")
    if mem is None:  # a result from before predictions: the memory that travelled
        strategy = result.get("strategy")
        xfer = result.get("transfer") or {}
        if strategy == "stop-and-copy":
            mem = xfer.get("memory_in_images_bytes")
        elif strategy == "post-copy":
            mem = (result.get("page_bytes") or 0) + (xfer.get("memory_in_images_bytes") or 0)
        else:
            mem = 0
    if not isinstance(mem, int | float) or mem < 0:
        return None
    rootfs = inputs.get("rootfs_bytes") or 0
    return {"memory_mib": mem / MIB, "rootfs_mib": rootfs / MIB, "downtime_ms": down, "total_ms": total}


def _moved_by_pages(result: dict) -> float:
    """The bytes a post-copy's page pull moved (counted in bytes_transferred, after the downtime)."""
    if result.get("strategy") != "post-copy":
        return 0
    return (result.get("page_bytes") or 0) + ((result.get("page_relay") or {}).get("bytes_up") or 0)


def _rate(moved, ms) -> float | None:
    """MiB/s, or None when too little moved to say anything of a rate (round trips, not bandwidth)."""
    if not isinstance(moved, int | float) or not isinstance(ms, int | float) or ms < 50 or moved < PATH_SAMPLE_MIN:
        return None
    return moved / MIB / (ms / 1000)


def path_rate_of(result: dict) -> float | None:
    """MiB/s the images' stream of one past migration moved at (its transfer phase: the images and the
    rootfs delta, container down). A result from before presync_bytes: all its bytes over presync and
    transfer together."""
    phases = result.get("phases") or {}
    moved = (result.get("bytes_transferred") or 0) - _moved_by_pages(result)
    if "presync_bytes" not in result:
        return _rate(moved, (phases.get("presync_ms") or 0) + (phases.get("transfer_ms") or 0))
    return _rate(moved - (result.get("presync_bytes") or 0), phases.get("transfer_ms") or 0)


def tree_rate_of(result: dict) -> float | None:
    """MiB/s the rootfs (a tree of files) of one past migration moved at in its presync."""
    return _rate(result.get("presync_bytes"), (result.get("phases") or {}).get("presync_ms"))


def page_rate_of(result: dict) -> float | None:
    if result.get("strategy") != "post-copy" or not result.get("pages_ms") or not result.get("page_bytes"):
        return None
    if result["page_bytes"] < 4 * MIB:
        return None
    return result["page_bytes"] / MIB / (result["pages_ms"] / 1000)


def _past(source: Host, target: Host) -> tuple[list[dict], list[dict]]:
    """Recent successful migrations' results: on this host pair (either way), and on any."""
    rows = list(
        Operation.objects.filter(kind=Operation.Kind.MIGRATE, status=Operation.Status.SUCCESS)
        .order_by("-finished_at")
        .values_list("host_id", "target_host_id", "result")[:200]
    )
    pair = {source.pk, target.pk}
    mine = [r for h, t, r in rows if {h, t} == pair and isinstance(r, dict)]
    return mine, [r for _, _, r in rows if isinstance(r, dict)]


def calibrate(source: Host, target: Host, inputs: Inputs, mine: list[dict], anywhere: list[dict]) -> Inputs:
    pair = f"on {source.name}/{target.name}"
    for rate_of, field_ in ((path_rate_of, "path"), (tree_rate_of, "tree")):
        for results, where in ((mine, pair), (anywhere, "on any hosts")):
            rates = [r for r in map(rate_of, results[:HISTORY]) if r]
            if rates:
                setattr(inputs, f"{field_}_mib_s", round(statistics.median(rates), 1))
                setattr(inputs, f"{field_}_source", f"{len(rates)} migrations {where}")
                break
    for results in (mine, anywhere):
        rates = [r for r in map(page_rate_of, results[:HISTORY]) if r]
        if rates:
            inputs.page_mib_s = round(statistics.median(rates), 2)
            break
    for strategy in PREDICTED:
        chosen, where = [], "prior"
        for results, label in ((mine, pair), (anywhere, "on any hosts")):
            chosen = [s for r in results if r.get("strategy") == strategy for s in [sample_of(r)] if s][:HISTORY]
            if chosen:
                where = label
                break
        inputs.calibration[strategy] = calibrate_one(
            strategy, chosen, inputs.path_mib_s, inputs.page_mib_s, where, inputs.tree_mib_s
        )
    return inputs


def gather(container: Container, target: Host, sample_s: float = 1.0) -> tuple[Inputs, str | None]:
    """The inputs for this container and target: (inputs, why the memory is unknown or None)."""
    inputs = Inputs(memory_bytes=None, rootfs_bytes=None, path_mib_s=PRIOR_PATH_MIB_S, page_mib_s=PRIOR_PAGE_MIB_S)
    why = None
    source = container.host
    try:
        with ssh.pooled(source) as conn:
            got = conn.run_agent("estimate", {"name": container.name, "sample_s": sample_s}, timeout=30).data
        got = got if isinstance(got, dict) else {}
        inputs.memory_bytes = _count(got.get("memory_bytes"))
        inputs.rootfs_bytes = _count(got.get("rootfs_bytes"))
        inputs.sample = got.get("sample") if isinstance(got.get("sample"), dict) else None
        if inputs.memory_bytes is None:
            why = f"{source.name} did not say how much memory {container.name} uses."
    except ssh.SSHError as e:
        why = f"{source.name}: {e}"
    mine, anywhere = _past(source, target)
    return calibrate(source, target, inputs, mine, anywhere), why


def _count(v) -> int | None:
    """A byte count from a host (which may lie): a non-negative int under 1 PiB, or None."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 50:
        return None
    return v


def table(support: dict[str, str | None], inputs: Inputs, why_unknown: str | None) -> dict:
    """The dry run's answer: per strategy {possible, why_not, predicted_downtime_ms,
    predicted_total_ms, calibration}, and the inputs used."""
    out = {}
    for strategy, why_not in support.items():
        p = predict(strategy, inputs) if strategy in PREDICTED else None
        cal = inputs.calibration.get(strategy)
        out[strategy] = {
            "possible": why_not is None,
            "why_not": why_not,
            "predicted_downtime_ms": p[0] if p else None,
            "predicted_total_ms": p[1] if p else None,
            "calibration": (
                {"fixed_ms": cal.fixed_ms, "ms_per_mib": cal.ms_per_mib, "rest_ms": cal.rest_ms, "source": cal.source}
                if cal
                else None
            ),
        }
        if p is None and strategy in PREDICTED:
            out[strategy]["why_no_prediction"] = why_unknown or "the memory size is unknown."
    return {"strategies": out, "inputs": inputs_dict(inputs)}


def inputs_dict(inputs: Inputs) -> dict:
    return {
        "memory_bytes": inputs.memory_bytes,
        "rootfs_bytes": inputs.rootfs_bytes,
        "path_mib_s": inputs.path_mib_s,
        "path_rate_from": inputs.path_source,
        "tree_mib_s": inputs.tree_mib_s,
        "tree_rate_from": inputs.tree_source,
        "page_mib_s": inputs.page_mib_s,
        "write_sample": inputs.sample,
    }


AUTO_ORDER = ("post-copy", "stop-and-copy", "restart")  # containers/migration.py choose_strategy's order


def within_budget(plan: dict, wanted: str, budget_ms: int) -> tuple[str | None, str]:
    """The strategy to use under a downtime budget, and why; (None, the refusal) when none fits."""
    strategies = plan["strategies"]
    candidates = AUTO_ORDER if wanted == "auto" else (wanted,)
    if wanted == "auto" and any((strategies.get(s) or {}).get("possible") for s in LIVE):
        # auto moves memory whenever it can: a cold restart loses it, so only when asked for
        candidates = AUTO_ORDER[:2]
    seen = []
    for s in candidates:
        row = strategies.get(s) or {}
        if not row.get("possible"):
            seen.append(f"{s} is not possible ({row.get('why_not')})")
            continue
        down = row.get("predicted_downtime_ms")
        if down is None:
            seen.append(f"{s} has no prediction ({row.get('why_no_prediction')})")
            continue
        if down <= budget_ms:
            return s, f"max_downtime_ms {budget_ms}: {s} predicted {down:.0f} ms of downtime"
        seen.append(f"{s} is predicted {down:.0f} ms")
    cold = (strategies.get("restart") or {}).get("predicted_downtime_ms")
    if candidates == AUTO_ORDER[:2] and cold is not None and (strategies.get("restart") or {}).get("possible"):
        seen.append(f"restart (cold: the memory is lost) is predicted {cold:.0f} ms; ask for it by name")
    return None, f"No strategy fits a downtime of {budget_ms} ms: {'; '.join(seen)}."


def for_migration(op: Operation, strategy: str, prep: dict) -> dict:
    """The prediction a migration keeps in its result: the one it was started with (a dry run's
    numbers, under a budget), else one made now from migrate-prepare's sizes and the history."""
    made = (op.params or {}).get("prediction")
    if isinstance(made, dict) and made.get("strategy") == strategy:
        return made
    inputs = Inputs(
        memory_bytes=_count(prep.get("dumpable_bytes", prep.get("memory_bytes"))),
        rootfs_bytes=_count(prep.get("rootfs_bytes")),
        path_mib_s=PRIOR_PATH_MIB_S,
        page_mib_s=PRIOR_PAGE_MIB_S,
    )
    mine, anywhere = _past(op.host, op.target_host)
    calibrate(op.host, op.target_host, inputs, mine, anywhere)
    p = predict(strategy, inputs)
    cal = inputs.calibration.get(strategy)
    return {
        "strategy": strategy,
        "predicted_downtime_ms": p[0] if p else None,
        "predicted_total_ms": p[1] if p else None,
        "calibration": cal
        and {"fixed_ms": cal.fixed_ms, "ms_per_mib": cal.ms_per_mib, "rest_ms": cal.rest_ms, "source": cal.source},
        "inputs": inputs_dict(inputs),
        "made": "when the migration started (its preflight's sizes)",
    }
