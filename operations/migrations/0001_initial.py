"""The Operation moved here from the containers app. Its table stays containers_operation
(Meta.db_table), so this migration changes Django's state only: an existing database keeps
its table, rows, indexes and constraints as they are (tests/test_operations_app_migration.py)."""

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ('containers', '0006_operation_waiting'),
        ('hosts', '0001_initial'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name='Operation',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('kind', models.CharField(choices=[('probe', 'Probe'), ('sync', 'Sync'), ('create', 'Create'), ('start', 'Start'), ('stop', 'Stop'), ('restart', 'Restart'), ('delete', 'Delete'), ('snapshot', 'Snapshot'), ('restore', 'Restore'), ('delete-snapshot', 'Delete Snapshot'), ('migrate', 'Migrate'), ('evacuate', 'Evacuate')], max_length=20)),
                        ('status', models.CharField(choices=[('pending', 'Pending'), ('running', 'Running'), ('waiting', 'Waiting'), ('success', 'Success'), ('failure', 'Failure'), ('cancelled', 'Cancelled')], db_index=True, default='pending', max_length=12)),
                        ('phase', models.CharField(default='queued', max_length=32)),
                        ('progress', models.PositiveSmallIntegerField(default=0)),
                        ('container_name', models.CharField(blank=True, db_index=True, max_length=63)),
                        ('params', models.JSONField(blank=True, default=dict)),
                        ('result', models.JSONField(blank=True, default=dict)),
                        ('error', models.TextField(blank=True)),
                        ('events', models.JSONField(blank=True, default=list)),
                        ('created_at', models.DateTimeField(db_index=True, default=django.utils.timezone.now)),
                        ('started_at', models.DateTimeField(blank=True, null=True)),
                        ('finished_at', models.DateTimeField(blank=True, null=True)),
                        ('worker', models.CharField(blank=True, help_text='Celery node that claimed it', max_length=200)),
                        ('heartbeat_at', models.DateTimeField(blank=True, help_text='Last sign of life of the job running it', null=True)),
                        ('cancel_requested', models.BooleanField(default=False)),
                        ('container', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='operations', to='containers.container')),
                        ('created_by', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, to=settings.AUTH_USER_MODEL)),
                        ('host', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='operations', to='hosts.host')),
                        ('parent', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='children', to='operations.operation')),
                        ('target_host', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='hosts.host')),
                    ],
                    options={
                        'db_table': 'containers_operation',
                        'ordering': ['-created_at', '-id'],
                        'indexes': [models.Index(condition=models.Q(('status__in', ['pending', 'running', 'waiting'])), fields=['container'], name='operation_active')],
                    },
                ),
            ],
            database_operations=[],
        ),
    ]
