from django.apps import AppConfig


class CtwebConfig(AppConfig):
    name = "ctweb"
    verbose_name = "ctweb"

    def ready(self):
        from . import schema  # noqa: F401  (registers the token scheme with drf-spectacular)
        from .access import connect_signals

        connect_signals()
