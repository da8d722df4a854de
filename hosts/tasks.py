import logging

from celery import shared_task

from .handlers import reprobe_offline_hosts as reprobe

log = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def reprobe_offline_hosts() -> None:
    """Scheduled: offline hosts are probed again with backoff and come back online when they answer."""
    started = reprobe()
    if started:
        log.info("probing offline host(s) again: %s", ", ".join(started))
