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
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return f"/containers/{self.name}/"


class Snapshot(models.Model):
    container = models.ForeignKey(Container, on_delete=models.CASCADE, related_name="snapshots")
    name = models.CharField(max_length=63, validators=[validate_name])
    stateful = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    size_bytes = models.BigIntegerField(default=0)
    stats = models.JSONField(default=dict, blank=True)
    contents = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["container", "name"], name="unique_snapshot_name")]

    def __str__(self) -> str:
        return f"{self.container}/{self.name}"


class Operation(models.Model):
    class Kind(models.TextChoices):
        PROBE = "probe"
        SYNC = "sync"
        CREATE = "create"
        START = "start"
        STOP = "stop"
        RESTART = "restart"
        DELETE = "delete"
        SNAPSHOT = "snapshot"
        RESTORE = "restore"
        DELETE_SNAPSHOT = "delete-snapshot"
        MIGRATE = "migrate"
        EVACUATE = "evacuate"

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        # Stopped where only time or a person can tell what is true (a host does not
        # answer): held by no worker thread, asked again with backoff, never taken for
        # lost nor tidied; `result.waiting` says why, `result.decision` offers actions.
        WAITING = "waiting"
        SUCCESS = "success"
        FAILURE = "failure"
        CANCELLED = "cancelled"

    ACTIVE = (Status.PENDING, Status.RUNNING, Status.WAITING)
    TERMINAL = (Status.SUCCESS, Status.FAILURE, Status.CANCELLED)

    kind = models.CharField(max_length=20, choices=Kind.choices)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING, db_index=True)
    phase = models.CharField(max_length=32, default="queued")
    progress = models.PositiveSmallIntegerField(default=0)
    # Names are kept beside the links: the history stays readable after a delete.
    container = models.ForeignKey(
        Container, null=True, blank=True, on_delete=models.SET_NULL, related_name="operations"
    )
    container_name = models.CharField(max_length=63, blank=True, db_index=True)
    host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="operations")
    target_host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="children")
    params = models.JSONField(default=dict, blank=True)
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    events = models.JSONField(default=list, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True, help_text="Celery node that claimed it")
    heartbeat_at = models.DateTimeField(null=True, blank=True, help_text="Last sign of life of the job running it")
    cancel_requested = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # "Does this container have an operation running?" is asked for every row of the container
            # list; active operations are few among the history, so this index stays tiny.
            models.Index(
                fields=["container"],
                condition=models.Q(status__in=["pending", "running", "waiting"]),
                name="operation_active",
            )
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.kind} {self.status}"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    def get_absolute_url(self) -> str:
        return f"/operations/{self.pk}/"

    def api_url(self) -> str:
        return f"/api/v1/operations/{self.pk}/"
