from django.apps import AppConfig


class HostsConfig(AppConfig):
    name = "hosts"

    def ready(self):
        from . import handlers, prepare  # noqa: F401  (register the probe and prepare handlers with the runner)
