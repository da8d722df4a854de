"""Export and import on the lab: a stateful snapshot of a running container downloaded as one
archive and imported on the other host as a new container through the browser's import page,
which resumes with its memory; a tampered or hostile archive refused, by the dashboard and by
the host's own agent, leaving nothing on the host; a kept export imported by its id, as a new container and as a snapshot of
an existing one."""

import hashlib
import io
import json
import re
import subprocess
import tarfile

import pytest
from playwright.sync_api import expect

from hosts.agent import agent_file_name
from tests.support.cli import ctweb
from tests.support.lab import COUNTER, PATTERN, counter, create, on_host, pattern, ping
from tests.support.stack import Api, ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]


def _leftovers(lab, host: str, name: str) -> list[str]:
    """What an import of `name` could leave on the host: the container, its snapshots, staging."""
    # One string: ssh hands it to the host's shell as it is.
    out = on_host(lab, host, "ls -a /var/lib/lxc; ls -a /var/lib/ctweb/snapshots 2>/dev/null || true")
    assert out.returncode == 0, out.stderr
    return [n for n in out.stdout.split() if n == name or n.startswith(".ctweb-import-")]


def _import(bob: Api, name: str, host: str, data: bytes) -> dict:
    r = bob.post("/api/v1/imports", data={"name": name, "host": host}, files={"archive": ("a.tar", data)})
    assert r.status_code == 202, r.text
    return bob.wait_operation(r.json()["id"], timeout=240)


def _addresses(lab, host: str, name: str) -> list[str]:
    """The IPv4 addresses the container's eth0 has, as its processes see them."""
    out = on_host(lab, host, "lxc-attach", "-n", name, "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0")
    assert out.returncode == 0, out.stderr
    return [
        w.split("/")[0]
        for line in out.stdout.splitlines()
        for i, w in enumerate(line.split())
        if i and line.split()[i - 1] == "inet"
    ]


def _delete(bob: Api, name: str) -> None:
    if bob.get(f"/api/v1/containers/{name}/").status_code == 200:
        run_op(bob, "DELETE", f"/api/v1/containers/{name}/")


def _import_in_browser(page, url: str, bob: Api, name: str, host: str, archive) -> dict:
    """The import page's form, as an operator fills it: the file, the name, the host."""
    page.goto(url + "/containers/")
    page.get_by_role("link", name="Import an archive").click()
    page.get_by_label("Archive (.tar)").set_input_files(str(archive))
    page.get_by_label("New container's name").fill(name)
    page.get_by_label("Host").select_option(host)
    page.get_by_role("button", name="Import").click()
    expect(page).to_have_url(re.compile(r"/operations/\d+/$"))
    op_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
    return bob.wait_operation(op_id, timeout=240)


def test_a_stateful_snapshot_exported_and_imported_on_another_host_resumes_with_its_memory(
    bob, lab, lab_stack, page_as, tmp_path
):
    ok(create(bob, name="exporter", host="lab-a", command=["sh", "-c", PATTERN]))
    try:
        start, now = pattern(lab, "lab-a", "exporter")
        assert start == now
        ok(run_op(bob, "POST", "/api/v1/containers/exporter/snapshots/", {"name": "frozen", "stateful": True}))
        at_snapshot = counter(lab, "lab-a", "exporter")

        op = ok(run_op(bob, "POST", "/api/v1/containers/exporter/snapshots/frozen/export"))
        url = op["result"]["download"]
        assert Api(lab_stack, lab_stack.tokens["carol"]).get(url).status_code == 403  # a viewer: no files, no memory
        r = bob.get(url)
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/x-tar"
        data = r.content
        assert len(data) == op["result"]["bytes"] and hashlib.sha256(data).hexdigest() == op["result"]["sha256"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            man = json.load(tar.extractfile("ctweb-export.json"))
        assert (man["container"], man["snapshot"], man["stateful"]) == ("exporter", "frozen", True)
        assert "export/frozen/images/inventory.img" in man["files"]

        archive = tmp_path / "exported.tar"
        archive.write_bytes(data)
        op = ok(_import_in_browser(page_as("bob"), lab_stack.url, bob, "imported", "lab-b", archive))  # the upload page
        assert op["result"]["from"]["container"] == "exporter"
        row = bob.get("/api/v1/containers/imported/").json()
        assert (row["host"], row["state"]) == ("lab-b", "STOPPED")
        snaps = bob.get("/api/v1/containers/imported/snapshots/").json()
        assert [(s["name"], s["stateful"]) for s in snaps] == [("frozen", True)]
        contents = bob.get("/api/v1/containers/imported/snapshots/frozen/").json()["contents"]
        assert any("md5sum" in p["command"] or "sh" in p["command"] for p in contents["processes"]), contents
        assert _leftovers(lab, "lab-b", "imported") == ["imported", "imported"]  # its container and snapshots

        restored = ok(run_op(bob, "POST", "/api/v1/containers/imported/snapshots/frozen/restore"))
        row = bob.get("/api/v1/containers/imported/").json()
        assert row["state"] == "RUNNING"
        # Its own address, the one reserved for it, not the exporter's (which still runs on lab-a).
        assert row["ipv4"] != bob.get("/api/v1/containers/exporter/").json()["ipv4"]
        assert _addresses(lab, "lab-b", "imported") == [row["ipv4"]]
        assert restored["result"]["address_changed"]["to"] == row["ipv4"]
        assert ping(row["ipv4"])
        # The very memory of the exported container: the pattern drawn before the snapshot, held
        # in the shell's memory, checksummed again every second (a cold start would draw another).
        assert pattern(lab, "lab-b", "imported") == (start, start)
        resumed = counter(lab, "lab-b", "imported")
        assert at_snapshot - 3 <= resumed <= at_snapshot + 10, (at_snapshot, resumed)  # went on, not from 1
    finally:
        _delete(bob, "imported")
        _delete(bob, "exporter")


def _agent_import(lab, host: str, name: str, data: bytes) -> list[dict]:
    """The host's agent `import`, fed an archive directly (as the dashboard would, past its own check)."""
    h = next(x for x in lab["hosts"] if x["name"] == host)
    params = json.dumps({"name": name, "stall_s": 10}).encode() + b"\n"
    p = subprocess.run(
        ["ssh", "-i", str(lab["key"]), "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={lab['known_hosts']}",
         "-o", "StrictHostKeyChecking=yes", f"root@{h['address']}",
         f"python3 /var/lib/ctweb/agent/{agent_file_name()} import"],
        input=params + data, capture_output=True, timeout=120,
    )  # fmt: skip
    return [json.loads(line) for line in p.stdout.decode().splitlines() if line.strip()]


def _forged(members) -> bytes:
    """An archive whose manifest matches its members (a forger's own)."""
    buf = io.BytesIO()
    files = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                files[name] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        man = {"format": "ctweb-export", "version": 1, "container": "x", "snapshot": "s1", "stateful": False,
               "created_at": "", "files": files, "links": {}}  # fmt: skip
        data = json.dumps(man).encode()
        info = tarfile.TarInfo("ctweb-export.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_tampered_or_hostile_archive_is_refused_and_leaves_nothing_on_the_host(bob, lab, lab_stack, tmp_path):
    ok(create(bob, name="tamper", host="lab-a", command=["sh", "-c", COUNTER]))
    try:
        ok(run_op(bob, "POST", "/api/v1/containers/tamper/snapshots/", {"name": "plain", "stateful": False}))
        # The terminal client's verbs: export downloads the archive; import of a tampered copy exits 1 with why.
        env = {"CTWEB_URL": lab_stack.url, "CTWEB_TOKEN": lab_stack.tokens["bob"]}
        cfg, path = tmp_path / "ctweb.json", tmp_path / "plain.tar"
        got = ctweb(cfg, "export", "tamper", "plain", "-o", str(path), env=env)
        assert got.returncode == 0 and "exported to" in got.stdout, got.stderr
        data = bytearray(path.read_bytes())
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
            busybox = next(m for m in tar if m.isreg() and m.size > 100000)
        data[busybox.offset_data + 4096] ^= 0x01  # one bit of the biggest file of the rootfs
        tampered = bytes(data)
        (tmp_path / "tampered.tar").write_bytes(tampered)
        refused = ctweb(cfg, "import", str(tmp_path / "tampered.tar"), "lab-b", "tampered", env=env)
        assert refused.returncode == 1 and "does not match its checksum" in refused.stderr, refused

        # Through the dashboard: refused by its check, before the host is asked; no record kept.
        op = _import(bob, "tampered", "lab-b", tampered)
        assert op["status"] == "failure", op
        assert "does not match its checksum" in op["error"] and busybox.name in op["error"], op["error"]
        assert bob.get("/api/v1/containers/tampered/").status_code == 404
        assert _leftovers(lab, "lab-b", "tampered") == []

        # The host's own check, for the same bytes sent past the dashboard: refused, nothing placed.
        said = _agent_import(lab, "lab-b", "tampered", tampered)
        assert said[-1]["type"] == "error" and "does not match its checksum" in said[-1]["message"], said
        assert _leftovers(lab, "lab-b", "tampered") == []

        # A forged archive whose manifest matches: a file through a rootfs symlink to the host's /etc.
        hostile = _forged(
            [
                ("export", "dir", None),
                ("export/s1", "dir", None),
                ("export/s1/config", "file", b"lxc.tty.max = 4\n"),
                ("export/s1/rootfs", "dir", None),
                ("export/s1/rootfs/etc", "symlink", "/etc"),
                ("export/s1/rootfs/etc/cron.d/ctweb-pwned", "file", b"* * * * * root touch /pwned\n"),
            ]
        )
        op = _import(bob, "hostile", "lab-b", hostile)
        assert op["status"] == "failure" and "beneath a member that is not a directory" in op["error"], op["error"]
        said = _agent_import(lab, "lab-b", "hostile", hostile)
        assert said[-1]["type"] == "error", said
        assert _leftovers(lab, "lab-b", "hostile") == []
        assert on_host(lab, "lab-b", "test", "-e", "/etc/cron.d/ctweb-pwned").returncode == 1

        # The untampered export, kept on the dashboard, imported by its id: a container that starts.
        kept = bob.get("/api/v1/operations/?kind=export&container=tamper").json()[0]["id"]
        op = ok(run_op(bob, "POST", "/api/v1/imports", {"name": "fromkept", "host": "lab-b", "export": kept}))
        assert op["result"]["stateful"] is False
        ok(run_op(bob, "POST", "/api/v1/containers/fromkept/state", {"action": "start"}))
        assert counter(lab, "lab-b", "fromkept") >= 1

        # The same export as a snapshot of an existing container (its own 'plain' deleted first).
        ok(run_op(bob, "DELETE", "/api/v1/containers/tamper/snapshots/plain/"))
        op = ok(run_op(bob, "POST", "/api/v1/imports", {"container": "tamper", "export": kept}))
        assert op["result"]["into"] is True
        assert [s["name"] for s in bob.get("/api/v1/containers/tamper/snapshots/").json()] == ["plain"]
        again = run_op(bob, "POST", "/api/v1/imports", {"container": "tamper", "export": kept})
        assert again["status"] == "failure" and "has a snapshot named plain already" in again["error"]
        ok(run_op(bob, "POST", "/api/v1/containers/tamper/snapshots/plain/restore"))
        assert bob.get("/api/v1/containers/tamper/").json()["state"] == "RUNNING"
        assert counter(lab, "lab-a", "tamper") >= 1
    finally:
        _delete(bob, "fromkept")
        _delete(bob, "tamper")


def test_an_expired_export_is_removed_by_the_retention_task_on_the_running_worker(bob, lab, lab_stack):
    """Export retention on the stack: an export that ended longer ago than CTWEB_EXPORT_KEEP_DAYS
    (7 by default; its end moved back in the database, as the days would) loses its archive when
    the retention task runs on the stack's worker, sent there as beat sends it (beat's own tick
    is hourly); a fresh export's archive stays. The operation says when its archive went."""
    ok(create(bob, name="kept", host="lab-a", command=["sh", "-c", COUNTER]))
    try:
        ok(run_op(bob, "POST", "/api/v1/containers/kept/snapshots/", {"name": "s1", "stateful": False}))
        old = ok(run_op(bob, "POST", "/api/v1/containers/kept/snapshots/s1/export"))
        fresh = ok(run_op(bob, "POST", "/api/v1/containers/kept/snapshots/s1/export"))
        exports = lab_stack.var / "exports" / "exports"
        assert (exports / f"op-{old['id']}.tar").is_file() and (exports / f"op-{fresh['id']}.tar").is_file()
        lab_stack.python(
            "from datetime import timedelta; from operations.models import Operation; "
            f"op = Operation.objects.get(pk={old['id']}); "
            "Operation.objects.filter(pk=op.pk).update(finished_at=op.finished_at - timedelta(days=8))"
        )
        lab_stack.python("from containers.tasks import expire_exports; expire_exports.delay()")  # to the worker
        wait_for(lambda: not (exports / f"op-{old['id']}.tar").exists(), 60, "the expired archive to go")
        assert bob.get(old["result"]["download"]).status_code == 404
        after = bob.get(f"/api/v1/operations/{old['id']}/").json()["result"]
        assert after["download"] is None and after["archive_deleted_at"]
        r = bob.get(fresh["result"]["download"])  # the fresh one is kept
        assert r.status_code == 200 and len(r.content) == fresh["result"]["bytes"]
    finally:
        _delete(bob, "kept")
