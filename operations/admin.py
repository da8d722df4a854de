from django.contrib import admin

from .models import Operation


@admin.register(Operation)
class OperationAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "status", "phase", "progress", "container_name", "host", "created_at"]
    list_filter = ["status", "kind"]
    search_fields = ["container_name"]
