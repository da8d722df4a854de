"""An import whose host's answer never came does not end on a guess (docs/RELIABILITY.md): it
waits, and its recovery asks the host whether the import was placed. The host is a table of
answers here; the imports themselves: tests/containers/test_e2e_lab_export.py."""

import io
from contextlib import contextmanager
from datetime import timedelta

import pytest
from django.core.files.storage import storages
from django.utils import timezone

from containers import exports, handlers
from containers.models import Container
from core.audit import Actor
from hosts import ssh
from hosts.models import Host
from operations import runner, tasks
from tests.support.agent_loader import small_export


@pytest.fixture
def importing(trusted_host, settings, tmp_path, monkeypatch, users):
    settings.STORAGES = {
        **settings.STORAGES,
        "exports": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": tmp_path}},
    }
    Host.objects.filter(pk=trusted_host.pk).update(
        capabilities={"network": {"subnet": "10.9.9.0/24", "bridge": "lxcbr0", "range": [100, 120]}}
    )
    # A real export of a real (small) snapshot, made by the agent in a temporary root.
    storages["exports"].save("uploads/a.tar", io.BytesIO(small_export(tmp_path / "host")))
    queued = []
    monkeypatch.setattr(tasks.recover_operation_task, "delay", queued.append)
    monkeypatch.setattr(tasks.run_operation_task, "delay", lambda *a: None)

    @contextmanager
    def pooled(host):
        class Conn:
            def open_stream(self, sub, params):
                return None

        yield Conn()

    def lost(channel, source, *a, **kw):
        source.read()
        raise ssh.AgentLost("The connection to h1 was lost before the agent finished.")

    monkeypatch.setattr(ssh, "pooled", pooled)
    monkeypatch.setattr(ssh, "upload", lost)
    op = exports.import_archive(
        Actor(users["bob"]), "c2", "h1", upload=_Upload(storages["exports"].open("uploads/a.tar").read())
    )
    assert runner.run_operation(op.pk, "w@a") == "waiting"
    op.refresh_from_db()
    return op, queued


class _Upload(io.BytesIO):
    @property
    def size(self):
        return len(self.getvalue())


def _recover(op, monkeypatch, answer):
    monkeypatch.setattr(handlers, "agent", lambda ctx, host, sub, params, *a, **kw: answer)
    assert runner.retry_waiting_operations("w@b", now=timezone.now() + timedelta(seconds=16)) == 1
    runner.recover_operation(op.pk, "w@b")
    op.refresh_from_db()
    return op


def test_a_lost_answer_waits_with_the_name_reserved(importing):
    op, _ = importing
    assert op.status == "waiting" and "asked again" in op.result["waiting"]["sentence"]
    assert Container.objects.get(name="c2").state == "CREATING"
    assert op.params["snapshot"] == "s1"  # what the recovery asks about


def test_a_finished_import_is_recorded_when_the_host_answers(importing, monkeypatch):
    op, _ = importing
    meta = {"snapshot": "s1", "container": "c2", "stateful": False, "size_bytes": 4096}
    op = _recover(op, monkeypatch, {"exists": True, "state": "STOPPED", "snapshot": meta})
    assert op.status == "success" and "are recorded" in op.result["recovered"]
    c2 = Container.objects.get(name="c2")
    assert c2.state == "STOPPED" and list(c2.snapshots.values_list("name", "size_bytes")) == [("s1", 4096)]


def test_an_import_the_host_never_placed_frees_the_name(importing, monkeypatch):
    op, _ = importing
    op = _recover(op, monkeypatch, {"exists": False, "state": None, "snapshot": None})
    assert op.status == "failure" and "Nothing of the import was placed on h1" in op.error
    assert not Container.objects.filter(name="c2").exists()
