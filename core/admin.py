import json

from django.contrib import admin

from .audit import audit
from .models import ApiToken, AuditEntry


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["user", "name", "prefix", "created_at", "last_used_at"]
    readonly_fields = ["digest", "prefix"]


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    """Read only: the admin site can list and open entries, never add, change or delete one."""

    list_display = ["at", "username", "action", "object_type", "object_name", "outcome"]
    list_filter = ["action", "outcome", "object_type"]
    search_fields = ["username", "object_name", "detail"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


# --- every change made through the admin site is audited -----------------------------------
# ModelAdmin records its additions, changes and deletions (bulk deletes included) through
# these three methods; each also writes an AuditEntry ("admin.add", "admin.change",
# "admin.delete"). No ModelAdmin of the project or of django.contrib overrides them
# (tests/security/test_audit.py checks every registered one).

_log_addition = admin.ModelAdmin.log_addition
_log_change = admin.ModelAdmin.log_change
_log_deletions = admin.ModelAdmin.log_deletions


def _admin_audit(request, action, obj, message="") -> None:
    from django.contrib.admin.models import LogEntry

    if isinstance(message, list):
        message = json.dumps(message)
    detail = LogEntry(change_message=message).get_change_message() if message else ""
    audit(
        request,
        f"admin.{action}",
        object_type=f"{obj._meta.app_label}.{obj._meta.model_name}",
        object_name=f"{obj.pk}: {obj}",
        detail=f"through the admin site. {detail}".strip(),
    )


def log_addition(self, request, obj, message):
    _admin_audit(request, "add", obj, message)
    return _log_addition(self, request, obj, message)


def log_change(self, request, obj, message):
    _admin_audit(request, "change", obj, message)
    return _log_change(self, request, obj, message)


def log_deletions(self, request, queryset):
    for obj in queryset:
        _admin_audit(request, "delete", obj)
    return _log_deletions(self, request, queryset)


admin.ModelAdmin.log_addition = log_addition
admin.ModelAdmin.log_change = log_change
admin.ModelAdmin.log_deletions = log_deletions
