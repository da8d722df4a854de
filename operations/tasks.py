import logging

from celery import current_app as app
from celery import shared_task
from celery.signals import worker_ready

from . import runner
from .runner import recover_operation_task, run_operation_task  # noqa: F401  (the job tasks live beside what queues them)

log = logging.getLogger(__name__)


def _alive(me: str):
    def alive(node: str) -> bool:
        if node == me:
            return True  # we are answering this very question
        try:
            return bool(app.control.ping(destination=[node], timeout=2.0))
        except Exception:
            return False

    return alive


@worker_ready.connect
def fail_lost_operations(sender=None, **kwargs) -> None:
    """A worker that starts takes over the operations a dead worker left running."""
    me = sender.hostname if sender is not None else ""
    lost = runner.mark_lost_operations(me, _alive(me), starting=True)
    if lost:
        log.warning("took over %d operation(s) whose worker was lost", lost)
    requeued = runner.requeue_pending()
    if requeued:
        log.warning("queued %d pending operation(s) again: their message may have been lost", requeued)


@shared_task(bind=True, ignore_result=True)
def find_lost_operations(self) -> None:
    """Scheduled: a worker that died while another one kept running is noticed too (its
    rows stop beating and its node stops answering)."""
    me = self.request.hostname or ""
    lost = runner.mark_lost_operations(me, _alive(me))
    if lost:
        log.warning("took over %d operation(s) whose worker was lost", lost)


@shared_task(bind=True, ignore_result=True)
def retry_waiting_operations(self) -> None:
    """Scheduled: operations waiting for a host ask it again when their backoff has passed."""
    taken = runner.retry_waiting_operations(self.request.hostname or "")
    if taken:
        log.info("asking the hosts again for %d waiting operation(s)", taken)
