from django.contrib import admin

from .models import Host

# What only the trust step (an admin confirming the fingerprint the host presents, in the
# dashboard or the API) and the probes write: never typed into a form.
TRUST_FIELDS = [
    "status",
    "status_message",
    "key_type",
    "key_data",
    "fingerprint",
    "offered_key_type",
    "offered_key_data",
    "offered_fingerprint",
    "capabilities",
    "last_probe_at",
]


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ["name", "address", "port", "status", "fingerprint", "last_probe_at"]
    list_filter = ["status", "is_lab"]
    search_fields = ["name", "address"]
    readonly_fields = TRUST_FIELDS
