"""A migration planned before it starts: the dry run (what each strategy would cost, from
containers/prediction.py) and the downtime budget (`max_downtime_ms`: the strategy whose
predicted downtime fits, in auto's order, or a refusal that names the predictions)."""

from __future__ import annotations

from core.api import ApiError
from core.audit import Actor
from operations.models import Operation

from . import prediction
from .migration import choose_strategy, start_migration, strategy_support
from .models import Container
from .services import usable_host

MAX_DOWNTIME_MS = 86_400_000  # a day: a budget beyond it is a typo, not a budget
BUDGET_ERROR = f"max_downtime_ms must be a whole number of milliseconds from 1 to {MAX_DOWNTIME_MS}."


def plan(container: Container, target_name: str, wanted: str) -> dict:
    """Every strategy's possibility and prediction for moving `container` to `target_name`."""
    target = usable_host(target_name, field="target_host")
    support = strategy_support(container, container.host, target)
    inputs, why_unknown = prediction.gather(container, target)
    out = prediction.table(support, inputs, why_unknown)
    try:
        chosen, why = choose_strategy(container, container.host, target, wanted)
        out["chosen"], out["why"] = chosen, why
    except ApiError as e:
        out["chosen"], out["why"] = None, str(e.detail)
    return {"container": container.name, "source": container.host.name, "target": target.name, **out}


def recorded(planned: dict, strategy: str) -> dict:
    """What a migration keeps of its plan (params.prediction, then result.prediction)."""
    row = planned["strategies"][strategy]
    return {
        "strategy": strategy,
        "predicted_downtime_ms": row["predicted_downtime_ms"],
        "predicted_total_ms": row["predicted_total_ms"],
        "calibration": row["calibration"],
        "inputs": planned["inputs"],
        "made": "before the request was accepted",
    }


def dry_run(container: Container, target_name: str, wanted: str, budget_ms: int | None) -> dict:
    planned = plan(container, target_name, wanted)
    if budget_ms is not None:
        chosen, why = prediction.within_budget(planned, wanted, budget_ms)
        planned.update(max_downtime_ms=budget_ms, chosen=chosen, why=why)
    return planned


def start_within_budget(actor: Actor, container: Container, target_name: str, wanted: str, budget_ms: int) -> Operation:
    """Start the migration with the strategy that fits the budget, or refuse (409) with the numbers."""
    planned = plan(container, target_name, wanted)
    if wanted != "auto" and planned["strategies"].get(wanted, {}).get("why_not"):
        raise ApiError(f"{wanted} is not possible: {planned['strategies'][wanted]['why_not']}", 409, "strategy")
    chosen, why = prediction.within_budget(planned, wanted, budget_ms)
    if chosen is None:
        raise ApiError(why, 409, "max_downtime_ms")
    return start_migration(
        actor,
        container,
        target_name,
        chosen,
        requested=wanted,
        why=why,
        max_downtime_ms=budget_ms,
        prediction=recorded(planned, chosen),
    )
