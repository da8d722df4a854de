from django.apps import AppConfig


class ContainersConfig(AppConfig):
    name = "containers"

    def ready(self):
        from . import jobs, migration  # noqa: F401  (register the container handlers with the runner)
