import hashlib
import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone


def hash_token(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiToken(models.Model):
    """An API token. Only its SHA-256 is stored; the key is shown once at creation."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=8, help_text="First characters of the key, to tell tokens apart")
    digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "ctweb_apitoken"  # the table it had in the ctweb app (no data moved)
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.user} {self.prefix}… {self.name}"

    @classmethod
    def issue(cls, user, name: str = "") -> tuple["ApiToken", str]:
        key = secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, name=name, prefix=key[:8], digest=hash_token(key))
        return token, key


class AuditEntryQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise PermissionError("Audit entries are never changed.")

    def delete(self):
        raise PermissionError("Audit entries are never deleted.")


class AuditEntry(models.Model):
    """Who did what to which object, when, and how it ended. Written once, never changed or
    deleted through the app: save() of an existing entry, delete() and the manager's
    update()/delete() raise. (Deleting a user still sets `user` to NULL through Django's
    base manager; `username` keeps the name.)"""

    at = models.DateTimeField(default=timezone.now, db_index=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    username = models.CharField(max_length=150, blank=True)
    action = models.CharField(max_length=64, db_index=True)
    object_type = models.CharField(max_length=32, blank=True)
    object_name = models.CharField(max_length=200, blank=True)
    outcome = models.CharField(max_length=16, default="ok")
    detail = models.TextField(blank=True)
    remote_addr = models.GenericIPAddressField(null=True, blank=True)

    objects = AuditEntryQuerySet.as_manager()

    class Meta:
        db_table = "ctweb_auditentry"  # the table it had in the ctweb app (no data moved)
        ordering = ["-at"]
        verbose_name_plural = "audit entries"

    def save(self, *args, **kwargs):
        if not self._state.adding or kwargs.get("force_update") or kwargs.get("update_fields") is not None:
            raise PermissionError("Audit entries are never changed.")
        kwargs["force_insert"] = True  # never an UPDATE of a row that happens to have this pk
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise PermissionError("Audit entries are never deleted.")

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.username} {self.action} {self.object_type}:{self.object_name} {self.outcome}"


class FleetSettings(models.Model):
    """Settings of the whole fleet that an admin changes (one row, pk 1; see core/fleet.py)."""

    # Networks (CIDR strings) on which two hosts may send a migration's tars and post-copy
    # pages straight to each other over TLS, instead of through the dashboard over SSH.
    direct_transfer_networks = models.JSONField(default=list, blank=True)
    # A post-copy's page pull is given up (both copies kept, for an admin) after this many
    # seconds without any progress; there is no limit on its total time.
    postcopy_stall_limit_s = models.PositiveIntegerField(default=600)
    # The most disk the snapshots on each host may take (MiB; 0: no budget). A snapshot that
    # would go past it is refused with the numbers before the container is frozen.
    snapshot_budget_mib = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(null=True, blank=True)
    updated_by = models.CharField(max_length=150, blank=True)

    class Meta:
        db_table = "ctweb_fleetsettings"  # the table it had in the ctweb app (no data moved)
        verbose_name_plural = "fleet settings"

    def __str__(self) -> str:
        return "fleet settings"

    @classmethod
    def load(cls) -> "FleetSettings":
        obj, _ = cls.objects.get_or_create(pk=1)
        return obj
