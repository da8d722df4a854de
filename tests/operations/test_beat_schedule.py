"""Every task the beat schedules is one the worker knows: a renamed or moved task must not
leave a beat entry that names nothing (it is sent, no worker takes it, and the job it stood
for, say the container states' refresh, silently stops)."""

from django.conf import settings

from ctweb.celery import app


def test_every_scheduled_task_is_registered():
    app.loader.import_default_modules()
    known = set(app.tasks)
    for entry, spec in settings.CELERY_BEAT_SCHEDULE.items():
        assert spec["task"] in known, f"beat entry {entry!r} names {spec['task']!r}, which no app registers"
