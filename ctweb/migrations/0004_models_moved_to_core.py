"""ApiToken, AuditEntry and FleetSettings moved to the core app (see core/migrations/0001_initial.py):
Django forgets them here without touching their tables, and their content types follow them,
so that permissions and admin log entries that name them stay attached."""

from django.db import migrations

MODELS = ("apitoken", "auditentry", "fleetsettings")


def _move(apps, schema_editor, source, target):
    ContentType = apps.get_model("contenttypes", "ContentType")
    db = schema_editor.connection.alias
    for model in MODELS:
        if not ContentType.objects.using(db).filter(app_label=target, model=model).exists():
            ContentType.objects.using(db).filter(app_label=source, model=model).update(app_label=target)


def forwards(apps, schema_editor):
    _move(apps, schema_editor, "ctweb", "core")


def backwards(apps, schema_editor):
    _move(apps, schema_editor, "core", "ctweb")


class Migration(migrations.Migration):
    dependencies = [
        ("ctweb", "0003_postcopy_stall_limit"),
        ("core", "0001_initial"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.DeleteModel(name="ApiToken"),
                migrations.DeleteModel(name="AuditEntry"),
                migrations.DeleteModel(name="FleetSettings"),
            ],
            database_operations=[],
        ),
        migrations.RunPython(forwards, backwards),
    ]
