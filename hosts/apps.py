from django.apps import AppConfig


class HostsConfig(AppConfig):
    name = "hosts"

    def ready(self):
        from . import handlers  # noqa: F401  (registers the probe handler with the runner)
