"""An export whose worker was lost is made again by the worker that takes it over (it only reads
on its host), and ends with a kept, checked archive; a host that cannot be reached then ends it
with a sentence. The host is a real agent's archive behind a fake connection here; the exports
themselves: tests/containers/test_e2e_lab_export.py."""

import hashlib
from contextlib import contextmanager

import pytest
from django.core.files.storage import storages

from containers import exports
from containers.models import Container, Snapshot
from hosts import ssh
from operations import runner
from operations.models import Operation
from tests.support.agent_loader import small_export


@pytest.fixture
def lost_export(trusted_host, settings, tmp_path, monkeypatch):
    settings.STORAGES = {
        **settings.STORAGES,
        "exports": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": tmp_path}},
    }
    archive = small_export(tmp_path / "host")
    c1 = Container.objects.create(name="c1", host=trusted_host, state="RUNNING")
    Snapshot.objects.create(container=c1, name="s1", stateful=False)
    # The row as a worker SIGKILLed mid-transfer left it: running, its worker gone.
    op = Operation.objects.create(kind="export", status="running", container=c1, container_name="c1",
                                  host=trusted_host, params={"snapshot": "s1"}, worker="w@a", phase="transfer")  # fmt: skip
    asked = []

    @contextmanager
    def pooled(host):
        class Conn:
            def open_stream(self, sub, params):
                asked.append((host.name, sub, params))
                return None

        yield Conn()

    def download(channel, out, on_bytes=None, max_bytes=None, timeout=0):
        out.write(archive)
        return len(archive)

    monkeypatch.setattr(ssh, "pooled", pooled)
    monkeypatch.setattr(ssh, "download", download)
    return op, archive, asked


def test_a_lost_export_is_made_again_by_the_next_worker_and_kept(lost_export):
    op, archive, asked = lost_export
    assert runner.recover_operation(op.pk, "w@b") == "success"
    op.refresh_from_db()
    assert asked == [("h1", "export", {"name": "c1", "snapshot": "s1"})]  # asked once more, from the start
    assert op.result["sha256"] == hashlib.sha256(archive).hexdigest() and op.result["bytes"] == len(archive)
    assert storages["exports"].open(exports.export_file(op.pk)).read() == archive
    assert op.worker == "w@b"


def test_a_lost_export_whose_host_is_gone_ends_with_a_sentence(lost_export, monkeypatch):
    op, _, _ = lost_export

    @contextmanager
    def unreachable(host):
        raise ssh.SSHError(f"{host.name} did not answer.")
        yield

    monkeypatch.setattr(ssh, "pooled", unreachable)
    status = runner.recover_operation(op.pk, "w@b")
    op.refresh_from_db()
    assert status == "failure" and "The export of s1 from h1 failed: h1 did not answer." in op.error
    assert not storages["exports"].exists(exports.export_file(op.pk))
