"""ApiToken, AuditEntry and FleetSettings moved here from the ctweb package (now only the
project on top). Their tables keep their names (Meta.db_table), so this migration changes
Django's state only: an existing database keeps its tables and rows as they are
(tests/operations/test_app_moves_migration.py)."""

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ('ctweb', '0003_postcopy_stall_limit'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name='FleetSettings',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('direct_transfer_networks', models.JSONField(blank=True, default=list)),
                        ('postcopy_stall_limit_s', models.PositiveIntegerField(default=600)),
                        ('updated_at', models.DateTimeField(blank=True, null=True)),
                        ('updated_by', models.CharField(blank=True, max_length=150)),
                    ],
                    options={
                        'verbose_name_plural': 'fleet settings',
                        'db_table': 'ctweb_fleetsettings',
                    },
                ),
                migrations.CreateModel(
                    name='ApiToken',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('name', models.CharField(blank=True, max_length=100)),
                        ('prefix', models.CharField(help_text='First characters of the key, to tell tokens apart', max_length=8)),
                        ('digest', models.CharField(max_length=64, unique=True)),
                        ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
                        ('last_used_at', models.DateTimeField(blank=True, null=True)),
                        ('user', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='api_tokens', to=settings.AUTH_USER_MODEL)),
                    ],
                    options={
                        'db_table': 'ctweb_apitoken',
                        'ordering': ['-created_at'],
                    },
                ),
                migrations.CreateModel(
                    name='AuditEntry',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('at', models.DateTimeField(db_index=True, default=django.utils.timezone.now)),
                        ('username', models.CharField(blank=True, max_length=150)),
                        ('action', models.CharField(db_index=True, max_length=64)),
                        ('object_type', models.CharField(blank=True, max_length=32)),
                        ('object_name', models.CharField(blank=True, max_length=200)),
                        ('outcome', models.CharField(default='ok', max_length=16)),
                        ('detail', models.TextField(blank=True)),
                        ('remote_addr', models.GenericIPAddressField(blank=True, null=True)),
                        ('user', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, to=settings.AUTH_USER_MODEL)),
                    ],
                    options={
                        'verbose_name_plural': 'audit entries',
                        'db_table': 'ctweb_auditentry',
                        'ordering': ['-at'],
                    },
                ),
            ],
            database_operations=[],
        ),
    ]
