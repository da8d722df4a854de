"""Where a migration is on its progress bar, and how long each of its phases took.

One table per run: its steps in the order they happen, each with the phase it belongs to
(the phases are the ones `result.phases` times: preflight, presync, dump, transfer,
restore, pages, cleanup) and its share of the bar in percent; a table's shares sum to 100.
The progress an operation reports is the shares of the steps before the current one plus
the current step's share times its own fraction (what its agent says, or 0 when it starts
and 1 when it ends). No percentage is set anywhere else. A step that does not happen in a
run (no snapshots to send) is jumped over: the bar moves on, never back.

A run that follows another on the same operation (a roll-back, a recovery, an admin's
decision) has a table too, spread over what is left of the bar from where it stands.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from operations.runner import OperationContext


class Step(NamedTuple):
    phase: str  # the phase it is timed in (result.phases), or the follow-up's own word
    name: str  # the step, unique in its table
    share: int  # percent of the bar (of what is left of it, for a follow-up)


PREFLIGHT = "preflight"
PRESYNC = "presync"
DUMP = "dump"
TRANSFER = "transfer"
RESTORE = "restore"
PAGES = "pages"
CLEANUP = "cleanup"

STRATEGY_STEPS: dict[str, tuple[Step, ...]] = {
    "stop-and-copy": (
        Step(PREFLIGHT, "prepare", 4),
        Step(PREFLIGHT, "check", 3),
        Step(PREFLIGHT, "cpuinfo", 1),
        Step(PREFLIGHT, "cpuinfo-check", 1),
        Step(PRESYNC, "rootfs", 32),
        Step(PRESYNC, "snapshots", 10),
        Step(PRESYNC, "state", 3),
        Step(DUMP, "dump", 11),
        Step(TRANSFER, "delta", 6),
        Step(TRANSFER, "images", 11),
        Step(RESTORE, "restore", 9),
        Step(CLEANUP, "cleanup-source", 6),
        Step(CLEANUP, "cleanup-target", 3),
    ),
    "post-copy": (
        Step(PREFLIGHT, "prepare", 4),
        Step(PREFLIGHT, "check", 3),
        Step(PREFLIGHT, "cpuinfo", 1),
        Step(PREFLIGHT, "cpuinfo-check", 1),
        Step(PRESYNC, "rootfs", 27),
        Step(PRESYNC, "snapshots", 8),
        Step(PRESYNC, "state", 2),
        Step(DUMP, "dump", 8),
        Step(TRANSFER, "delta", 5),
        Step(TRANSFER, "images", 6),
        Step(RESTORE, "restore", 8),
        Step(PAGES, "pull", 15),
        Step(PAGES, "finish", 3),
        Step(CLEANUP, "cleanup-source", 6),
        Step(CLEANUP, "cleanup-target", 3),
    ),
    # Cold: no memory, so no CPU check and no images; "dump" is the stop, "restore" the start.
    "restart": (
        Step(PREFLIGHT, "prepare", 5),
        Step(PREFLIGHT, "check", 4),
        Step(PRESYNC, "rootfs", 33),
        Step(PRESYNC, "snapshots", 10),
        Step(PRESYNC, "state", 3),
        Step(DUMP, "dump", 10),
        Step(TRANSFER, "delta", 17),
        Step(RESTORE, "restore", 9),
        Step(CLEANUP, "cleanup-source", 6),
        Step(CLEANUP, "cleanup-target", 3),
    ),
}

# Follow-ups, each over what is left of the bar.
ROLL_BACK = (  # a failed or cancelled run puts the container back on its source (rollback.py)
    Step(CLEANUP, "abort-target", 20),
    Step(CLEANUP, "inspect-source", 20),
    Step(CLEANUP, "resume-source", 40),
    Step(CLEANUP, "cleanup-source", 20),
)
RECOVERY = (  # a lost worker's migration, asked where it stopped (recovery.py)
    Step("recovery", "inspect-source", 20),
    Step("recovery", "inspect-target", 20),
    Step("recovery", "cleanup-target", 30),
    Step("recovery", "cleanup-source", 30),
)
FINISH_PULL = (  # a post-copy's page pull, going on after a lost worker or a wait (postcopy.py)
    Step(PAGES, "pull", 60),
    Step(PAGES, "finish", 10),
    Step(CLEANUP, "cleanup-source", 20),
    Step(CLEANUP, "cleanup-target", 10),
)
RESUME_DECISION = (  # an admin's decision: resume on the source (decisions.py)
    Step("decision", "abort-target", 20),
    Step("decision", "resume-source", 70),
    Step("decision", "cleanup-source", 10),
)
LAZY_RESUME = (  # a post-copy given back to its source's frozen tasks, by force (postcopy.py)
    Step("decision", "abort-target", 20),
    Step("decision", "resume-source", 60),
    Step("decision", "cleanup-source", 20),
)
EVACUATION = (  # a host's containers handed to migrations of their own (evacuation.py)
    Step("preflight", "plan", 1),
    Step("migrate", "start", 1),
    Step("migrate", "wait", 98),  # the children's own bars show how they go
)


class Progress:
    """A run's place on the operation's progress bar, from its table."""

    def __init__(self, ctx: OperationContext, steps: tuple[Step, ...], start: float = 0.0):
        self.ctx, self.steps = ctx, steps
        self.start = max(0.0, min(100.0, float(start)))
        self._base: dict[str, tuple[float, float]] = {}
        done = 0
        for step in steps:
            self._base[step.name] = (done, step.share)
            done += step.share

    @classmethod
    def rest_of(cls, ctx: OperationContext, steps: tuple[Step, ...]) -> Progress:
        """A follow-up's progress: its table over what is left of the bar."""
        return cls(ctx, steps, start=ctx.op.progress or 0)

    def at(self, step: str, fraction: float = 0.0) -> float:
        """The bar's percentage `fraction` of the way through `step`."""
        base, share = self._base[step]
        fraction = max(0.0, min(1.0, fraction))
        return self.start + (base + share * fraction) * (100.0 - self.start) / 100.0

    def span(self, step: str) -> tuple[float, float]:
        """(where the step starts, how much of the bar it covers), in percent."""
        begin = self.at(step)
        return begin, self.at(step, 1.0) - begin

    def event(self, phase: str, message: str, step: str, fraction: float = 0.0, **extra) -> None:
        """An event of the operation (`phase` is its word, as the operation page shows it)."""
        self.ctx.event(phase, message, self.at(step, fraction), **extra)

    def relay(self, step: str) -> Callable[[dict], None]:
        """An agent's event callback: its 0-100 is the step's own fraction."""
        base, span = self.span(step)
        on_event = self.ctx.relay(base, span)

        def relay(msg: dict) -> None:
            p = msg.get("progress")
            if p is not None:
                try:
                    msg = {**msg, "progress": max(0.0, min(100.0, float(p)))}  # the host may lie
                except (TypeError, ValueError):
                    msg = {k: v for k, v in msg.items() if k != "progress"}
            on_event(msg)

        return relay


class Clock:
    """How long each phase of a run took (result.phases: `<phase>_ms`)."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.marks: dict[str, float] = {}
        self._start = self.t0

    def lap(self, phase: str) -> float:
        now = time.monotonic()
        ms = (now - self._start) * 1000
        self.marks[f"{phase}_ms"] = round(self.marks.get(f"{phase}_ms", 0) + ms, 1)
        self._start = now
        return ms
