from django.contrib import admin

from .models import Container, Snapshot


@admin.register(Container)
class ContainerAdmin(admin.ModelAdmin):
    list_display = ["name", "host", "state", "ipv4", "template", "has_saved_state"]
    list_filter = ["state", "host"]
    search_fields = ["name"]


@admin.register(Snapshot)
class SnapshotAdmin(admin.ModelAdmin):
    list_display = ["container", "name", "stateful", "created_at", "size_bytes"]
    list_filter = ["stateful"]
