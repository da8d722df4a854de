from django.apps import AppConfig


class ContainersConfig(AppConfig):
    name = "containers"

    def ready(self):
        from . import exports, handlers, migration, recovery  # noqa: F401  (register the container operations with the runner)
