from django.contrib import admin

from .models import ApiToken, AuditEntry


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["user", "name", "prefix", "created_at", "last_used_at"]
    readonly_fields = ["digest", "prefix"]


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ["at", "username", "action", "object_type", "object_name", "outcome"]
    list_filter = ["action", "outcome", "object_type"]
    search_fields = ["username", "object_name", "detail"]
