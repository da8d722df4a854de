"""Models moved between apps keep their tables and rows: a database at the schema main had
before the moves (Operation in `containers`; ApiToken, AuditEntry, FleetSettings in `ctweb`)
migrates to the new apps (operations, core) without losing a row, a link or an index, and
the content types follow the models."""

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

# Where main's schema was before the moves: the apps that did not exist yet are unapplied.
BEFORE = {
    "containers": "0006_operation_waiting",
    "ctweb": "0003_postcopy_stall_limit",
    "operations": None,
    "core": None,
}


def _latest():
    return MigrationExecutor(connection).loader.graph.leaf_nodes()


def _before():
    return [(app, BEFORE[app]) if app in BEFORE else (app, name) for app, name in _latest()]


def _migrate(targets):
    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    executor.loader.build_graph()
    return executor.loader.project_state([t for t in targets if t[1] is not None]).apps


@pytest.mark.django_db(transaction=True)
def test_an_existing_database_keeps_its_operations_when_the_model_moves_apps():
    old = _migrate(_before())
    ContentType = old.get_model("contenttypes", "ContentType")
    for app, model in [("containers", "operation"), ("ctweb", "apitoken"), ("ctweb", "auditentry")]:
        ContentType.objects.get_or_create(app_label=app, model=model)
    User = old.get_model("auth", "User")
    alice = User.objects.create(username="alice")
    token = old.get_model("ctweb", "ApiToken").objects.create(user=alice, name="ci", prefix="abcd1234", digest="d" * 64)
    entry = old.get_model("ctweb", "AuditEntry").objects.create(user=alice, username="alice", action="host.add")
    old.get_model("ctweb", "FleetSettings").objects.update_or_create(
        pk=1, defaults={"direct_transfer_networks": ["10.0.0.0/24"], "postcopy_stall_limit_s": 42}
    )
    Host = old.get_model("hosts", "Host")
    Container = old.get_model("containers", "Container")
    Operation = old.get_model("containers", "Operation")
    h1 = Host.objects.create(name="h1", address="10.0.0.1")
    h2 = Host.objects.create(name="h2", address="10.0.0.2")
    c = Container.objects.create(name="c1", host=h1)
    parent = Operation.objects.create(kind="evacuate", status="waiting", host=h1, result={"children": [1]})
    child = Operation.objects.create(
        kind="migrate",
        status="running",
        container=c,
        container_name="c1",
        host=h1,
        target_host=h2,
        parent=parent,
        params={"strategy": "post-copy"},
        events=[{"phase": "dump", "seq": 0}],
        worker="w@a",
    )

    new = _migrate(_latest())

    Moved = new.get_model("operations", "Operation")
    assert Moved._meta.db_table == "containers_operation"
    assert Moved.objects.count() == 2
    got = Moved.objects.get(pk=child.pk)
    assert (got.kind, got.status, got.worker, got.params, got.events) == (
        "migrate",
        "running",
        "w@a",
        {"strategy": "post-copy"},
        [{"phase": "dump", "seq": 0}],
    )
    assert (got.container_id, got.host_id, got.target_host_id, got.parent_id) == (c.pk, h1.pk, h2.pk, parent.pk)
    assert Moved.objects.get(pk=parent.pk).result == {"children": [1]}
    # The partial index of active operations is still there.
    with connection.cursor() as cur:
        indexes = connection.introspection.get_constraints(cur, "containers_operation")
    assert "operation_active" in indexes
    # Permissions and admin log entries that name the model follow it.
    CT = new.get_model("contenttypes", "ContentType")
    assert CT.objects.filter(app_label="operations", model="operation").count() == 1
    assert not CT.objects.filter(app_label="containers", model="operation").exists()

    # The floor's models, moved from ctweb to core.
    Token = new.get_model("core", "ApiToken")
    assert Token._meta.db_table == "ctweb_apitoken"
    assert list(Token.objects.values_list("pk", "user_id", "name", "digest")) == [(token.pk, alice.pk, "ci", "d" * 64)]
    Entry = new.get_model("core", "AuditEntry")
    assert list(Entry.objects.values_list("pk", "user_id", "action")) == [(entry.pk, alice.pk, "host.add")]
    fleet = new.get_model("core", "FleetSettings").objects.get(pk=1)
    assert (fleet.direct_transfer_networks, fleet.postcopy_stall_limit_s) == (["10.0.0.0/24"], 42)
    assert CT.objects.filter(app_label="core", model__in=["apitoken", "auditentry"]).count() == 2
    assert not CT.objects.filter(app_label="ctweb").exists()


@pytest.mark.django_db(transaction=True)
def test_the_moves_create_no_table():
    """The moves are state only: no SQL that creates, drops or renames a table."""
    import io

    out = io.StringIO()
    call_command("sqlmigrate", "operations", "0001", stdout=out)
    call_command("sqlmigrate", "containers", "0007", stdout=out)
    call_command("sqlmigrate", "core", "0001", stdout=out)
    call_command("sqlmigrate", "ctweb", "0004", stdout=out)
    sql = out.getvalue().upper()
    assert "CREATE TABLE" not in sql and "DROP TABLE" not in sql and "ALTER TABLE" not in sql
