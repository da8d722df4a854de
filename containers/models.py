from django.conf import settings
from django.db import models
from django.utils import timezone

from hosts.models import Host
from hosts.validators import validate_name


class Container(models.Model):
    class State(models.TextChoices):
        RUNNING = "RUNNING"
        STOPPED = "STOPPED"
        FROZEN = "FROZEN"
        STARTING = "STARTING"
        STOPPING = "STOPPING"
        CREATING = "CREATING"
        UNKNOWN = "UNKNOWN"

    name = models.CharField(max_length=63, unique=True, validators=[validate_name])
    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="containers")
    state = models.CharField(max_length=16, choices=State.choices, default=State.UNKNOWN, db_index=True)
    template = models.CharField(max_length=32, blank=True)
    command = models.JSONField(null=True, blank=True)
    ipv4 = models.GenericIPAddressField(protocol="IPv4", null=True, blank=True, unique=True)
    ipv6 = models.GenericIPAddressField(protocol="IPv6", null=True, blank=True)
    type = models.CharField(max_length=16, default="PERSISTENT")
    has_saved_state = models.BooleanField(default=False, help_text="Stopped statefully; the next start restores")
    config_warnings = models.JSONField(
        default=list, blank=True, help_text="Keys of its LXC config outside ctweb's allowlist (made outside ctweb)"
    )
    # The last `check` operation's answer: {status: yes|no|unknown, reasons: [...], verified_at, ...}
    # ({} until one ran); containers/handlers.py check.
    checkpointable = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return f"/containers/{self.name}/"


class SnapshotSchedule(models.Model):
    """Snapshots taken every N minutes/hours/days, stateful or not, with their retention: keep
    the last K and/or those younger than D days (containers/schedules.py; run by Celery beat)."""

    class Unit(models.TextChoices):
        MINUTES = "minutes"
        HOURS = "hours"
        DAYS = "days"

    container = models.ForeignKey(Container, on_delete=models.CASCADE, related_name="schedules")
    every = models.PositiveIntegerField()
    unit = models.CharField(max_length=8, choices=Unit.choices)
    stateful = models.BooleanField(default=True)
    keep_last = models.PositiveIntegerField(null=True, blank=True, help_text="Keep its newest K snapshots")
    keep_days = models.PositiveIntegerField(null=True, blank=True, help_text="Keep its snapshots younger than D days")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)
    next_run_at = models.DateTimeField(db_index=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_note = models.CharField(max_length=300, blank=True, help_text="Why its last run took no snapshot")

    class Meta:
        ordering = ["container", "pk"]

    def __str__(self) -> str:
        return f"{self.container}: every {self.every} {self.unit}"


class Snapshot(models.Model):
    container = models.ForeignKey(Container, on_delete=models.CASCADE, related_name="snapshots")
    name = models.CharField(max_length=63, validators=[validate_name])
    stateful = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    size_bytes = models.BigIntegerField(default=0, help_text="The whole snapshot on its host's disk, each file once")
    added_bytes = models.BigIntegerField(
        null=True, blank=True, help_text="The disk it added when taken (what it does not share with earlier snapshots)"
    )
    images_bytes = models.BigIntegerField(null=True, blank=True, help_text="Its memory images as stored")
    images_raw_bytes = models.BigIntegerField(null=True, blank=True, help_text="Its memory images uncompressed")
    images_compression = models.CharField(max_length=16, blank=True, help_text="zstd, or empty: stored as dumped")
    stats = models.JSONField(default=dict, blank=True)
    contents = models.JSONField(default=dict, blank=True)
    schedule = models.ForeignKey(
        SnapshotSchedule, null=True, blank=True, on_delete=models.SET_NULL, related_name="snapshots"
    )

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["container", "name"], name="unique_snapshot_name")]

    def __str__(self) -> str:
        return f"{self.container}/{self.name}"
