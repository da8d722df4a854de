from celery import shared_task
from django.conf import settings

from hosts.models import Host

from .exports import expire_exports as expire_archives
from .handlers import canary_checks, refresh_host
from .schedules import run_schedules


@shared_task(ignore_result=True)
def refresh_container_states() -> None:
    """Keep the container list fresh between operations (scheduled by the worker's beat)."""
    for host in Host.objects.filter(status=Host.Status.ONLINE):
        refresh_host(host)


@shared_task(ignore_result=True)
def checkpoint_canary() -> None:
    """Scheduled: re-verify every running container's checkpointability every
    CTWEB_CANARY_HOURS hours (0: never) with an ordinary check operation, never within
    CTWEB_CANARY_QUIET_MINUTES of another operation of the container."""
    canary_checks(settings.CTWEB_CANARY_HOURS, quiet_minutes=settings.CTWEB_CANARY_QUIET_MINUTES)


@shared_task(ignore_result=True)
def run_snapshot_schedules() -> None:
    """Take the scheduled snapshots that are due and apply retention (scheduled by beat)."""
    run_schedules()


@shared_task(ignore_result=True)
def expire_exports() -> None:
    """Kept export archives past CTWEB_EXPORT_KEEP_DAYS, and forgotten uploads, removed."""
    expire_archives()
