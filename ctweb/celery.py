import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ctweb.settings")

app = Celery("ctweb")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.worker_init.connect
def _check_ssh_key(**kwargs):
    """A worker without the fleet's SSH key refuses to start once hosts exist (one sentence):
    it would fail to log in everywhere and mark the whole fleet offline."""
    import django

    django.setup()
    from hosts.ssh import check_key_at_start  # Django's apps must be ready first

    check_key_at_start()
