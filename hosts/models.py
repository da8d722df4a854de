from django.db import models
from django.utils import timezone

from .validators import validate_address, validate_name, validate_username


class Host(models.Model):
    class Status(models.TextChoices):
        UNTRUSTED = "untrusted", "untrusted"  # key seen, not yet pinned: nothing runs there
        TRUSTED = "trusted", "trusted"  # key pinned, not probed yet
        ONLINE = "online", "online"
        OFFLINE = "offline", "offline"
        KEY_MISMATCH = "key-mismatch", "host key changed"  # blocked until an admin re-trusts

    name = models.CharField(max_length=63, unique=True, validators=[validate_name])
    address = models.CharField(max_length=253, validators=[validate_address])
    port = models.PositiveIntegerField(default=22)
    username = models.CharField(max_length=32, default="root", validators=[validate_username])
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.UNTRUSTED, db_index=True)
    status_message = models.TextField(blank=True)
    # The pinned key ("ssh-ed25519", base64 blob). Empty until an admin trusts one.
    key_type = models.CharField(max_length=64, blank=True)
    key_data = models.TextField(blank=True)
    fingerprint = models.CharField(max_length=100, blank=True)
    # The key the host presented last when it differed from the pinned one (or before trust).
    offered_key_type = models.CharField(max_length=64, blank=True)
    offered_key_data = models.TextField(blank=True)
    offered_fingerprint = models.CharField(max_length=100, blank=True)
    capabilities = models.JSONField(default=dict, blank=True)
    last_probe_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    is_lab = models.BooleanField(default=False, help_text="Made by `manage.py lab`")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_trusted(self) -> bool:
        return bool(self.key_data) and self.status != self.Status.KEY_MISMATCH

    @property
    def is_blocked(self) -> bool:
        return self.status == self.Status.KEY_MISMATCH
