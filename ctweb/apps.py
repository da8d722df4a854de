from django.apps import AppConfig


class CtwebConfig(AppConfig):
    """The project: settings, URLs, ASGI, Celery and the pages that span the apps. An installed
    app only for the history of its migrations (its models moved to core, tables unchanged)."""

    name = "ctweb"
    verbose_name = "ctweb"
