"""Live migration: moving a container, its root filesystem and snapshots to another host.

The worker relays every byte between its two SSH connections (no host trusts another;
everything is encrypted), unless an admin allowed direct transfer on a network holding
both hosts' addresses (core/fleet.py): then the tars and post-copy pages go from host to
host over TLS 1.3 with certificates the worker makes for the migration (the pages fall back
to the dashboard if the target cannot reach the source's page relay).
The result's `transport` and `transfer` say which path was taken. Strategies:
- stop-and-copy: sync the rootfs while the container runs, dump and stop it, send the
  images and the rootfs delta, restore on the target;
- restart: the same without memory (stop, copy, start cold), for what CRIU cannot dump,
  and the only way to move a stopped container;
- post-copy: dump without the memory pages (CRIU lazy pages), restore on the target at
  once, and let the target pull the pages from the source's page server -- through a page
  relay on each host (CRIU holds a socketpair to it, no port) and the dashboard pumping
  between the relays over SSH; a broken link or a lost worker only pauses the pull (see
  docs/RELIABILITY.md, "Post-copy: where the state lives"); the source is cleaned up only
  once every page arrived;
- pre-copy is refused with the reason until it is shipped here.

A container is never lost and never runs on two hosts: the source is stopped before the
target restores, and the source copy is removed only after the target runs it.

The package, in the order a migration goes through it:
- preflight.py: which strategies both hosts allow, `auto` resolved, the operation written;
- run.py: the `migrate` handler, one run of a strategy step by step;
- phases.py: each run's table of steps (phase, share of the progress bar) and its clock;
- transfer.py: how the tars travel (relayed over SSH, or direct where allowed);
- postcopy.py: the page pull, and what follows when it stops;
- rollback.py: a failed run given back to the source;
- recovery.py: a lost worker's migration, asked where it stopped;
- decisions.py: an admin's decision on a waiting migration;
- evacuation.py: every container of a host moved, one migration each;
- common.py: the agent call on an open connection, the record that follows the container.
"""

from . import decisions, recovery, run  # noqa: F401  (register the handlers with the runner)
from .decisions import MIGRATION_ACTIONS, decide_migration, lazy_resume_decision, resume_on_source
from .evacuation import check_evacuation, start_evacuation
from .phases import STRATEGY_STEPS
from .postcopy import (
    POSTCOPY_RESUME,
    finish_lost_pull,
    lazy_resume_on_source,
    postcopy_actions,
    pull_pages,
    stall_limit_s,
)
from .preflight import STRATEGIES, choose_strategy, start_migration, strategy_support
from .rollback import RESUME_SOURCE, roll_back, unreachable_target_actions

__all__ = [
    "MIGRATION_ACTIONS",
    "POSTCOPY_RESUME",
    "RESUME_SOURCE",
    "STRATEGIES",
    "STRATEGY_STEPS",
    "check_evacuation",
    "choose_strategy",
    "decide_migration",
    "finish_lost_pull",
    "lazy_resume_decision",
    "lazy_resume_on_source",
    "postcopy_actions",
    "pull_pages",
    "resume_on_source",
    "roll_back",
    "stall_limit_s",
    "start_evacuation",
    "start_migration",
    "strategy_support",
    "unreachable_target_actions",
]
