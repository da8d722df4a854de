"""The Operation moved to the operations app (see operations/migrations/0001_initial.py):
Django forgets it here without touching its table, and its content type follows it, so
that permissions and admin log entries that name it stay attached."""

from django.db import migrations


def move_content_type(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    db = schema_editor.connection.alias
    if not ContentType.objects.using(db).filter(app_label="operations", model="operation").exists():
        ContentType.objects.using(db).filter(app_label="containers", model="operation").update(app_label="operations")


def move_content_type_back(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    db = schema_editor.connection.alias
    if not ContentType.objects.using(db).filter(app_label="containers", model="operation").exists():
        ContentType.objects.using(db).filter(app_label="operations", model="operation").update(app_label="containers")


class Migration(migrations.Migration):
    dependencies = [
        ("containers", "0006_operation_waiting"),
        ("operations", "0001_initial"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="Operation")],
            database_operations=[],
        ),
        migrations.RunPython(move_content_type, move_content_type_back),
    ]
