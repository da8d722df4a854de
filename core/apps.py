from django.apps import AppConfig


class CoreConfig(AppConfig):
    """The floor every app stands on: users' roles and tokens, the audit trail, API errors,
    websocket access checks, fleet settings. It imports no other app of the project."""

    name = "core"

    def ready(self):
        from . import schema  # noqa: F401  (registers the token scheme with drf-spectacular)
        from .access import connect_signals

        connect_signals()
