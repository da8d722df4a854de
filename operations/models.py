"""The Operation: one row per background job, the truth its runner, its page and its
websockets read. The features' models are named by string ("containers.Container",
"hosts.Host"): no import goes up from here."""

from django.conf import settings
from django.db import models
from django.utils import timezone


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
        CHECK = "check"
        PREPARE = "prepare"
        EXPORT = "export"
        IMPORT = "import"

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
        "containers.Container", null=True, blank=True, on_delete=models.SET_NULL, related_name="operations"
    )
    container_name = models.CharField(max_length=63, blank=True, db_index=True)
    host = models.ForeignKey("hosts.Host", null=True, blank=True, on_delete=models.SET_NULL, related_name="operations")
    target_host = models.ForeignKey("hosts.Host", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
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
        # The table it had in the containers app: moving the model moved no data.
        db_table = "containers_operation"
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
