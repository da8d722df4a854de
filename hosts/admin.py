from django.contrib import admin

from .models import Host


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ["name", "address", "port", "status", "fingerprint", "last_probe_at"]
    list_filter = ["status", "is_lab"]
    search_fields = ["name", "address"]
