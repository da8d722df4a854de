"""One runner for every background job.

It claims the Operation row by compare-and-set on its status, runs the job's handler,
and always ends the row in exactly one terminal state. Handlers raise
OperationFailed for expected failures (a sentence for the operator) and anything
else is a crash: its traceback goes to the worker log, a short sentence to the user.

The features (containers, hosts) register, per operation kind, what runs it (`handler`)
and its hooks: what finds out where a lost one stopped (`recovers`), what carries out an
admin's decision on a waiting one (`decision_handler`), what gives back what its request
reserved when it never ran to the end (`undoes`) and what collects a debug bundle when it
fails (`collects_bundle`). The runner imports no feature.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timedelta

from celery import shared_task
from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from . import events
from .models import Operation

log = logging.getLogger(__name__)

SAVE_INTERVAL_S = 0.5  # progress is written to the row at most this often
HEARTBEAT_S = 5  # a running job touches its row this often, whatever it is doing

HANDLERS: dict[str, Callable[[OperationContext], dict | None]] = {}
# kind -> fn(ctx) -> a sentence (the row fails with it) or a dict (it succeeds with it),
# for a row whose worker was lost or that waits (see mark_lost_operations, WaitFor).
RECOVERERS: dict[str, Callable[[OperationContext], str | dict]] = {}
# Kinds whose recovery's OperationFailed is their own outcome (an evacuation whose children
# failed), not a recovery that could not finish.
FAILURE_IS_OUTCOME: set[str] = set()
# kind -> fn(op): gives back what the request reserved, when the job was cancelled or never queued.
UNDOERS: dict[str, Callable[[Operation], None]] = {}
# kind -> fn(op) -> names of the files it saved in bundles.bundle_dir(op.pk) (best effort, never raises).
BUNDLERS: dict[str, Callable[[Operation], list[str]]] = {}
EXPLAINERS: list[Callable[[Operation, OperationFailed], dict | None]] = []


def handler(kind: str):
    def register(fn):
        HANDLERS[kind] = fn
        return fn

    return register


def recovers(*kinds: str, failure_is_outcome: bool = False):
    def register(fn):
        for kind in kinds:
            RECOVERERS[kind] = fn
            if failure_is_outcome:
                FAILURE_IS_OUTCOME.add(kind)
        return fn

    return register


def undoes(*kinds: str):
    def register(fn):
        for kind in kinds:
            UNDOERS[kind] = fn
        return fn

    return register


def collects_bundle(*kinds: str):
    def register(fn):
        for kind in kinds:
            BUNDLERS[kind] = fn
        return fn

    return register


def explains(fn):
    """Register fn(op, failure) -> dict | None: what a failed operation's error means, kept as
    `result.explanation` (a sentence and a fix the page shows first). The first answer wins."""
    EXPLAINERS.append(fn)
    return fn


def undo(op: Operation) -> None:
    """Give back what the request of a job that did not run to its end reserved (if its kind says how)."""
    fn = UNDOERS.get(op.kind)
    if fn is not None:
        fn(op)


class OperationFailed(Exception):
    """An expected failure. `message` is for the operator; `details` are log lines that explain it;
    `host` names the host whose lines they are, when one host's agent reported it."""

    def __init__(
        self, message: str, details: str = "", result: dict | None = None, host: str = "", unanswered: bool = False
    ):
        super().__init__(message)
        self.message = message
        # True where no host answered (a broken link, an agent that died): what was asked may or
        # may not have happened there; the caller asks again rather than taking it for a refusal.
        self.unanswered = unanswered
        self.details = details
        self.result = result or {}
        self.host = host


class Cancelled(Exception):
    pass


class WaitFor(Exception):
    """The outcome is unknown (a host does not answer, the database could not be written):
    nothing may be taken for granted, so the row waits, held by no thread, and is asked
    again later (retry_waiting_operations). `actions` ([{"id", "label", "consequence"}])
    are offered to an admin as `result.decision`; the kind's decision_handler runs the
    chosen one. The id "keep-waiting" is handled here: it only asks again at once."""

    def __init__(self, sentence: str, actions: list[dict] | None = None, changed: Callable[[], bool] | None = None):
        super().__init__(sentence)
        self.sentence = sentence
        self.actions = actions or []
        self.changed = changed  # asked once parked: True if what it waits for came meanwhile


def _park_and_recheck(op: Operation, wait: WaitFor) -> None:
    if park(op, wait) and wait.changed is not None and wait.changed():
        ask_again(op.pk)  # e.g. the last child ended between the check and the park


KEEP_WAITING = "keep-waiting"
WAIT_FIRST_S = 15  # the first retry of a waiting operation; it doubles up to WAIT_MAX_S
WAIT_MAX_S = 300

DECISION_HANDLERS: dict[str, Callable[[OperationContext, str], str]] = {}


def decision_handler(kind: str):
    """Register what runs an admin's decision on a waiting operation of `kind`:
    fn(ctx, action_id) -> the result of a success; it raises OperationFailed to end the
    operation failed with its sentence (a migration rolled back), WaitFor to wait again."""

    def register(fn):
        DECISION_HANDLERS[kind] = fn
        return fn

    return register


def wait_backoff(attempts: int) -> int:
    """Seconds before asking again, after `attempts` unanswered attempts (1, 2, ...)."""
    return int(min(WAIT_MAX_S, WAIT_FIRST_S * 2 ** max(0, attempts - 1)))


class OperationContext:
    def __init__(self, op: Operation):
        self.op = op
        self._last_save = 0.0
        self._dirty = False

    def event(self, phase: str, message: str, progress: int | None = None, **extra) -> None:
        """Record an event: on the row (throttled) and to the websocket groups (at once)."""
        op = self.op
        entry = {"at": timezone.now().isoformat(), "phase": phase, "message": message, "seq": len(op.events)}
        if progress is not None:
            op.progress = max(0, min(100, int(progress)))
            entry["progress"] = op.progress
        entry.update({k: v for k, v in extra.items() if k not in entry})
        phase_changed = phase != op.phase
        op.phase = phase
        op.events.append(entry)
        self._dirty = True
        now = time.monotonic()
        if phase_changed or now - self._last_save >= SAVE_INTERVAL_S:
            self.save()
        events.publish_operation(op, entry)

    def save(self) -> None:
        if not self._dirty:
            return
        op = self.op
        Operation.objects.filter(pk=op.pk).update(
            phase=op.phase, progress=op.progress, events=op.events, result=op.result
        )
        self._dirty = False
        self._last_save = time.monotonic()

    def remember(self, **values) -> None:
        """Keep facts in the row's result at once (a recovery after a lost worker reads them)."""
        self.op.result.update(values)
        self._dirty = True
        self.save()

    def cancel_requested(self) -> bool:
        return Operation.objects.filter(pk=self.op.pk, cancel_requested=True).exists()

    def check_cancel(self) -> None:
        if self.cancel_requested():
            raise Cancelled()

    def relay(self, phase_base: int = 0, phase_span: int = 100) -> Callable[[dict], None]:
        """An agent event callback that maps the agent's 0-100 onto a slice of this operation."""

        def on_event(msg: dict) -> None:
            progress = msg.get("progress")
            if progress is not None:
                progress = phase_base + progress * phase_span / 100
            extra = {k: v for k, v in msg.items() if k not in ("type", "phase", "message", "progress", "t")}
            if "t" in msg:
                extra["agent_t"] = msg["t"]  # when the agent printed it (its clock), for latency figures
            self.event(msg.get("phase") or self.op.phase, msg.get("message") or "", progress, **extra)

        return on_event


def finish(op: Operation, status: str, *, error: str = "", result: dict | None = None) -> bool:
    """Move a running row to a terminal state; False if something else already ended it."""
    now = timezone.now()
    if result is not None:
        op.result = result
    op.events.append({"at": now.isoformat(), "phase": status, "message": error or status, "seq": len(op.events)})
    fields = {
        "status": status,
        "finished_at": now,
        "error": error,
        "result": op.result,
        "events": op.events,
        "phase": op.phase,
        "progress": 100 if status == Operation.Status.SUCCESS else op.progress,
    }
    ended = Operation.objects.filter(pk=op.pk, status=Operation.Status.RUNNING).update(**fields)
    if ended:
        for k, v in fields.items():
            setattr(op, k, v)
        events.publish_operation(op, op.events[-1])
        if op.parent_id:
            ask_again(op.parent_id)
    return bool(ended)


def ask_again(op_id: int) -> None:
    """A waiting row is taken (compare-and-set) and its recovery queued now: a child of it
    ended, a cancel or a decision came. No scheduler tick is needed."""
    if Operation.objects.filter(pk=op_id, status=Operation.Status.WAITING).update(
        status=Operation.Status.RUNNING, worker="", heartbeat_at=timezone.now(), phase="recovery"
    ):
        transaction.on_commit(lambda: recover_operation_task.delay(op_id))


def park(op: Operation, wait: WaitFor, tries: int = 6) -> bool:
    """Move a running row to `waiting` (see WaitFor). The write is tried a few times (the
    database itself may be what failed); if it never goes through, the row stays running,
    stops beating, and the lost-worker detector recovers it later."""
    for attempt in range(tries):
        try:
            now = timezone.now()
            fresh = Operation.objects.get(pk=op.pk)
            result = {**fresh.result, **{k: v for k, v in op.result.items() if k not in ("decision", "decided")}}
            before = result.get("waiting") or {}
            attempts = int(before.get("attempts") or 0) + 1
            result["waiting"] = {
                "sentence": wait.sentence,
                "since": before.get("since") or now.isoformat(),
                "attempts": attempts,
                "retry_at": (now + timedelta(seconds=wait_backoff(attempts))).isoformat(),
            }
            result.pop("decided", None)
            if wait.actions:
                result["decision"] = {"sentence": wait.sentence, "actions": wait.actions}
            else:
                result.pop("decision", None)
            events = list(op.events) + [{"at": now.isoformat(), "phase": "waiting", "message": wait.sentence}]
            events[-1]["seq"] = len(events) - 1
            fields = {
                "status": Operation.Status.WAITING,
                "phase": "waiting",
                "result": result,
                "events": events,
                "worker": "",
                "heartbeat_at": None,
            }
            if not Operation.objects.filter(pk=op.pk, status=Operation.Status.RUNNING).update(**fields):
                return False
            for k, v in fields.items():
                setattr(op, k, v)
            _publish(op, op.events[-1])
            return True
        except Exception as e:
            log.warning("operation %s could not be set waiting (%s); trying again", op.pk, e)
            try:
                connection.close()
            except Exception:
                pass
            time.sleep(min(2**attempt, 10))
    return False


def _publish(op: Operation, entry: dict) -> None:
    try:
        events.publish_operation(op, entry)
    except Exception as e:
        log.warning("could not publish operation %s: %s", op.pk, e)


def run_operation(op_id: int, worker: str = "") -> str | None:
    """Claim, run and end one operation. Safe to call twice: the second call does nothing."""
    claimed = Operation.objects.filter(pk=op_id, status=Operation.Status.PENDING).update(
        status=Operation.Status.RUNNING, started_at=timezone.now(), heartbeat_at=timezone.now(), worker=worker[:200]
    )
    if not claimed:
        log.info("operation %s is not pending any more; nothing to do", op_id)
        return None
    op = Operation.objects.select_related("host", "target_host", "container").get(pk=op_id)
    ctx = OperationContext(op)
    events.publish_operation(op)
    fn = HANDLERS.get(op.kind)
    decided = op.result.get("decided")
    if decided and not decided.get("ran"):  # an admin's decision on a waiting row: run it
        fn = _decision_runner(op, decided)
    with Heartbeat(op.pk):
        _run(op, ctx, fn)
    return Operation.objects.values_list("status", flat=True).get(pk=op_id)


# The operations a thread of this process is running now (the job or its recovery): the
# lost-worker detector of this process never takes them over, whatever their heartbeat says.
# The worker runs a thread pool (Procfile), so this is every job of the node.
_LIVE: set[int] = set()
_LIVE_LOCK = threading.Lock()


def running_here() -> set[int]:
    with _LIVE_LOCK:
        return set(_LIVE)


class Heartbeat:
    """Touch the row every few seconds while its job runs, so that a busy worker (one
    that is slow to answer a ping) is never taken for a dead one. A database error does
    not stop it: it closes its connection and tries again at the next beat, for as long
    as the job runs."""

    def __init__(self, op_id: int):
        self.op_id = op_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{op_id}", daemon=True)
        self.failures = 0  # beats that could not be written (for the log and the tests)
        self.beats = 0

    def _beat(self) -> None:
        failing = 0
        try:  # the claim set the first beat
            while not self.stop.wait(HEARTBEAT_S):
                try:
                    Operation.objects.filter(pk=self.op_id, status=Operation.Status.RUNNING).update(
                        heartbeat_at=timezone.now()
                    )
                    self.beats += 1
                    if failing:
                        log.warning("heartbeat of operation %s written again after %d failure(s)", self.op_id, failing)
                    failing = 0
                except Exception as e:  # the database is away for a while: try again at the next beat
                    failing += 1
                    self.failures += 1
                    log.warning("heartbeat of operation %s could not be written (%s); retrying", self.op_id, e)
                    try:
                        connection.close()  # a broken connection is opened afresh at the next beat
                    except Exception:
                        pass
        finally:
            try:
                connection.close()
            except Exception:
                pass

    def __enter__(self) -> Heartbeat:
        with _LIVE_LOCK:
            _LIVE.add(self.op_id)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        with _LIVE_LOCK:
            _LIVE.discard(self.op_id)


def _decision_runner(op: Operation, decided: dict):
    def run(ctx: OperationContext) -> dict:
        handle = DECISION_HANDLERS.get(op.kind)
        if handle is None:
            raise OperationFailed(f"This version of ctweb cannot carry out decisions on '{op.kind}' operations.")
        ctx.remember(decided={**decided, "ran": True})
        ctx.event("decision", f"carrying out the decision of {decided.get('by')}: {decided.get('label')}")
        return handle(ctx, decided["action"]) or {}

    return run


def _run(op: Operation, ctx: OperationContext, fn) -> None:
    try:
        if fn is None:
            raise OperationFailed(f"This version of ctweb cannot run '{op.kind}' operations yet.")
        if op.cancel_requested:
            raise Cancelled()
        result = fn(ctx) or {}
        ctx.save()
        finish(op, Operation.Status.SUCCESS, result={**op.result, **result})
    except WaitFor as e:
        _save_quietly(ctx)
        _park_and_recheck(op, e)
    except DatabaseError as e:
        if op.kind not in RECOVERERS:
            _crash(op, ctx)
            return
        # A write of this job failed: what the hosts did is asked again (its recovery).
        log.error("operation %s (%s): database error:\n%s", op.pk, op.kind, traceback.format_exc())
        park(op, WaitFor(f"The database could not be written ({type(e).__name__}); ctweb asks the hosts again."))
    except Cancelled as e:
        ctx.save()
        undo(op)
        finish(op, Operation.Status.CANCELLED, error=f"Cancelled at the operator's request. {e}".strip())
    except OperationFailed as e:
        ctx.save()
        message = e.message if not e.details else f"{e.message}\n\n{e.details}"
        result = {**op.result, **e.result, **_bundle(ctx), **_explain(op, e)}
        finish(op, Operation.Status.FAILURE, error=message, result=result)
    except Exception:
        _crash(op, ctx)


def _save_quietly(ctx: OperationContext) -> None:
    try:
        ctx.save()
    except Exception as e:
        log.warning("operation %s: progress not saved: %s", ctx.op.pk, e)


def _crash(op: Operation, ctx: OperationContext) -> None:
    log.error("operation %s (%s) crashed:\n%s", op.pk, op.kind, traceback.format_exc())
    ctx.save()
    finish(
        op,
        Operation.Status.FAILURE,
        error="ctweb hit an internal error while running this operation; the worker log has the details.",
        result={**op.result, **_bundle(ctx)},
    )


def _bundle(ctx: OperationContext) -> dict:
    collect = BUNDLERS.get(ctx.op.kind)
    if collect is None:
        return {}
    ctx.event("bundle", "collecting a debug bundle from the hosts")
    files = collect(ctx.op)
    return {"bundle": files} if files else {}


def _explain(op: Operation, failure: OperationFailed) -> dict:
    for fn in EXPLAINERS:
        try:
            found = fn(op, failure)
        except Exception:  # the failure's own sentence matters more than its explanation
            log.exception("operation %s: explaining its failure failed", op.pk)
            continue
        if found:
            return {"explanation": found}
    return {}


def enqueue(op: Operation) -> Operation:
    """Queue the job once the row is committed, so the worker always finds it."""

    def send():
        try:
            run_operation_task.delay(op.pk)
        except Exception as e:
            log.error("could not queue operation %s: %s", op.pk, e)
            fail_unqueued(op.pk, f"The job queue is unreachable ({e}); nothing was done. Try again when it is back.")

    transaction.on_commit(send)
    return op


def fail_unqueued(op_id: int, error: str) -> None:
    """End a job that never reached a worker, and undo what its request reserved."""
    now = timezone.now()
    if Operation.objects.filter(pk=op_id, status=Operation.Status.PENDING).update(
        status=Operation.Status.FAILURE, error=error, finished_at=now
    ):
        op = Operation.objects.select_related("host").get(pk=op_id)
        undo(op)
        events.publish_operation(op)


def mark_lost_operations(me: str, alive: Callable[[str], bool], *, starting: bool = False) -> int:
    """Take over the rows a dead worker left running. `me` is this worker's node name,
    `alive(node)` says whether another node answers; `starting` is True when this node has
    just started (then whatever its name held before is gone: a node name runs once).

    A row is never taken while a thread of this process runs it (running_here()). Else it
    is lost when it was ours at start, or when it has shown no heartbeat for OPERATION_LOST_AFTER_S
    and its worker is nobody, is us (and no thread of ours runs it), or does not answer.
    Kinds with a recovery (see recovery.py) stay running under this worker until the
    recovery has found where their container ended up; the others fail at once."""
    stale = timezone.now() - timedelta(seconds=settings.OPERATION_LOST_AFTER_S)
    lost = 0
    for op in Operation.objects.filter(status=Operation.Status.RUNNING).select_related("host", "target_host"):
        if op.pk in running_here():
            continue
        beating = op.heartbeat_at is not None and op.heartbeat_at > stale
        if not (starting and me and op.worker == me):
            if beating:
                continue
            if op.worker and op.worker != me and alive(op.worker):
                continue
        if op.kind in RECOVERERS:
            taken = Operation.objects.filter(
                pk=op.pk, status=Operation.Status.RUNNING, worker=op.worker, heartbeat_at=op.heartbeat_at
            ).update(worker=me[:200], heartbeat_at=timezone.now(), phase="recovery")
            if taken:
                lost += 1
                recover_operation_task.delay(op.pk)
            continue
        if finish(
            op,
            Operation.Status.FAILURE,
            error="Worker lost: the worker running this operation stopped before it finished. "
            "Check the container's state on its host before retrying.",
        ):
            lost += 1
    return lost


def recover_operation(op_id: int, worker: str = "") -> str | None:
    """Find out where a lost operation left its container, put it right, end the row."""
    op = Operation.objects.select_related("host", "target_host", "container").get(pk=op_id)
    if op.status != Operation.Status.RUNNING or op.kind not in RECOVERERS:
        return None
    if worker:  # the node that runs the recovery holds the row from now on
        Operation.objects.filter(pk=op_id, status=Operation.Status.RUNNING).update(
            worker=worker[:200], heartbeat_at=timezone.now()
        )
    ctx = OperationContext(op)
    waited = op.result.get("waiting")
    if waited:
        ctx.event("recovery", f"asking the hosts again (attempt {int(waited.get('attempts') or 0) + 1})")
        prefix = f"After waiting since {waited.get('since', '')[:19].replace('T', ' ')} UTC: "
    else:
        ctx.event("recovery", "the worker running this operation was lost; finding out where it stopped on the hosts")
        prefix = "Worker lost: the worker running this operation stopped before it finished. "
    with Heartbeat(op.pk):
        try:
            outcome = RECOVERERS[op.kind](ctx)
        except WaitFor as e:
            _save_quietly(ctx)
            _park_and_recheck(op, e)
            return op.status
        except Cancelled as e:
            _save_quietly(ctx)
            finish(op, Operation.Status.CANCELLED, error=str(e) or "Cancelled at the operator's request.")
            return op.status
        except OperationFailed as e:
            if op.kind in FAILURE_IS_OUTCOME:  # e.g. an evacuation's children's outcome, not a recovery's
                finish(op, Operation.Status.FAILURE, error=e.message, result={**op.result, **e.result})
                return op.status
            outcome = f"Recovery could not finish: {e.message} Check the hosts before retrying."
        except Exception as e:
            if isinstance(e, DatabaseError):
                log.error("recovery of operation %s: database error:\n%s", op.pk, traceback.format_exc())
                park(op, WaitFor(f"The database could not be written ({type(e).__name__}); ctweb asks again."))
                return op.status
            log.error("recovery of operation %s crashed:\n%s", op.pk, traceback.format_exc())
            outcome = f"Recovery could not finish ({type(e).__name__}); the worker log has the details."
        ctx.save()
        if isinstance(outcome, dict):  # it was found finished: a success
            finish(op, Operation.Status.SUCCESS, result={**op.result, **outcome})
        else:
            finish(op, Operation.Status.FAILURE, error=f"{prefix}{outcome}")
    return op.status


def retry_waiting_operations(me: str, now=None) -> int:
    """Scheduled: a waiting row whose retry time has come is taken (compare-and-set) and its
    recovery asks the hosts again. No thread is held between two attempts."""
    now = now or timezone.now()
    taken = 0
    for op in Operation.objects.filter(status=Operation.Status.WAITING):
        retry_at = (op.result.get("waiting") or {}).get("retry_at")
        try:
            due = retry_at is None or datetime.fromisoformat(retry_at) <= now
        except ValueError:
            due = True
        if not due or op.kind not in RECOVERERS:
            continue
        if Operation.objects.filter(pk=op.pk, status=Operation.Status.WAITING, result=op.result).update(
            status=Operation.Status.RUNNING, worker=me[:200], heartbeat_at=timezone.now(), phase="recovery"
        ):
            taken += 1
            recover_operation_task.delay(op.pk)
    return taken


class DecisionRefused(Exception):
    pass


def decide(op_id: int, action: str, user) -> Operation:
    """An admin's decision on a waiting operation. "keep-waiting" asks the hosts again at
    once and leaves the row waiting; any other offered action re-queues the row, and the
    kind's decision_handler carries it out."""

    with transaction.atomic():
        op = Operation.objects.select_for_update().get(pk=op_id)
        decision = op.result.get("decision") if op.status == Operation.Status.WAITING else None
        if not decision:
            raise DecisionRefused(f"Operation {op.pk} is {op.status}: it waits for no decision.")
        chosen = next((a for a in decision.get("actions") or [] if a.get("id") == action), None)
        if chosen is None:
            ids = ", ".join(a.get("id", "") for a in decision.get("actions") or [])
            raise DecisionRefused(f"'{action}' is not one of this operation's actions ({ids}).")
        now = timezone.now()
        record = {
            "action": action,
            "label": chosen.get("label"),
            "by": getattr(user, "username", ""),
            "at": now.isoformat(),
        }
        op.result.setdefault("decisions", []).append(record)
        op.events.append(
            {
                "at": now.isoformat(),
                "phase": "decision",
                "message": f"{record['by']} chose: {record['label']}",
                "seq": len(op.events),
            }
        )
        if action == KEEP_WAITING:
            Operation.objects.filter(pk=op.pk).update(result=op.result, events=op.events)
            ask_again(op.pk)
        else:
            op.result.pop("decision", None)
            op.result["decided"] = record
            op.status = Operation.Status.PENDING
            Operation.objects.filter(pk=op.pk).update(status=op.status, result=op.result, events=op.events)
            enqueue(op)
    _publish(op, op.events[-1])
    return op


def requeue_pending(older_than_s: float = 10) -> int:
    """Send again the jobs still pending after a while (their message may have died with a
    worker or a Redis restart). Harmless twice: only one run can claim a row."""
    cutoff = timezone.now() - timedelta(seconds=older_than_s)
    ids = list(
        Operation.objects.filter(status=Operation.Status.PENDING, created_at__lt=cutoff).values_list("pk", flat=True)
    )
    for op_id in ids:
        run_operation_task.delay(op_id)
    return len(ids)


# The tasks that run a job and its recovery. The names are those they had in
# containers/tasks.py: a message queued by the previous version is still run after an upgrade.
@shared_task(bind=True, ignore_result=True, name="containers.tasks.run_operation_task")
def run_operation_task(self, op_id: int) -> None:
    run_operation(op_id, worker=self.request.hostname or "")


@shared_task(bind=True, ignore_result=True, name="containers.tasks.recover_operation_task")
def recover_operation_task(self, op_id: int) -> None:
    recover_operation(op_id, worker=self.request.hostname or "")
