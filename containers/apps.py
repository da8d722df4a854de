from django.apps import AppConfig


class ContainersConfig(AppConfig):
    name = "containers"

    def ready(self):
        from . import jobs  # noqa: F401  (registers the container handlers with the runner)
