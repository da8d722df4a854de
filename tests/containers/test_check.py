"""Checkpointability (issue 17 item 1), the dashboard's side: the check operation turns the host's
scan and trial dump into the container's `checkpointable`, deciding the status itself and keeping
only short text of known classes from what the host sent. The host is a table of answers here;
on the lab: tests/lab/test_agent_check.py and tests/containers/test_e2e_lab_explained.py."""

import pytest

from containers import handlers
from containers.models import Container
from core.models import AuditEntry
from operations import runner
from operations.models import Operation

PROCESSES = {"class": "processes", "sentence": "Process 806 (sleep) belongs to a session ...", "fix": "Use setsid."}
SESSION_LOG = (
    "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
    "Error (criu/cr-dump.c:1528): A session leader of 806(13) is outside of its pid namespace\n"
    "Error (criu/cr-dump.c:1975): Dumping FAILED."
)


@pytest.fixture
def checking(db, trusted_host, monkeypatch):
    c = Container.objects.create(name="c1", host=trusted_host, state="RUNNING")
    sent = []

    def run(answer: dict, trial: bool = True) -> Container:
        def agent(ctx, host, sub, params, *a, **kw):
            sent.append((sub, params))
            return answer

        monkeypatch.setattr(handlers, "agent", agent)
        op = Operation.objects.create(kind="check", container=c, container_name="c1", host=trusted_host,
                                      params={"trial": trial})  # fmt: skip
        assert runner.run_operation(op.pk) == "success"
        op.refresh_from_db()
        c.refresh_from_db()
        c.op = op
        return c

    return run, sent


def test_a_trial_that_went_through_makes_it_checkpointable_and_verified(checking):
    run, sent = checking
    c = run({"reasons": [], "processes": 2, "trial": {"ok": True, "frozen_ms": 143.0, "total_ms": 272}})
    assert sent == [("check", {"name": "c1", "trial": True})]
    k = c.checkpointable
    assert (k["status"], k["reasons"], k["operation"], k["trial_frozen_ms"]) == ("yes", [], c.op.pk, 143.0)
    assert k["verified_at"] and k["checked_at"]


def test_a_scan_alone_with_nothing_found_is_unknown_not_yes(checking):
    run, _ = checking
    k = run({"reasons": [], "processes": 2, "trial": None, "status": "yes"}, trial=False).checkpointable
    assert (k["status"], k["verified_at"]) == ("unknown", None)  # the host's own "status" is not taken


def test_blockers_and_a_failed_trial_say_why_with_a_fix(checking):
    run, _ = checking
    c = run({"reasons": [PROCESSES], "trial": {"ok": False, "details": SESSION_LOG}})
    k = c.checkpointable
    assert k["status"] == "no" and [r["class"] for r in k["reasons"]] == ["processes", "processes"]
    assert k["reasons"][1]["sentence"].startswith("The trial dump failed: A process in the container belongs")
    assert "A session leader of 806(13)" in k["reasons"][1]["line"]
    assert c.op.result["trial_log"] == SESSION_LOG and c.op.status == "success"


def test_a_failed_trial_ctweb_cannot_read_is_still_a_no(checking):
    run, _ = checking
    k = run({"reasons": [], "trial": {"ok": False, "details": "Error (criu/x.c:1): something new"}}).checkpointable
    assert k["status"] == "no" and k["reasons"][0]["class"] == "unknown"


def test_what_a_host_sends_is_cut_to_known_short_text(checking):
    run, _ = checking
    hostile = [
        {"class": "<script>", "sentence": "x" * 5000, "fix": None, "extra": "dropped"},
        "not a dict",
        *[PROCESSES] * 100,
    ]
    k = run({"reasons": hostile, "trial": None}).checkpointable
    assert len(k["reasons"]) == 19  # 20 looked at, one of them not a reason
    first = k["reasons"][0]
    assert first == {"class": "unknown", "sentence": "x" * 300, "fix": ""}


def test_only_a_running_container_is_checked(db, trusted_host, client, users):
    Container.objects.create(name="c2", host=trusted_host, state="STOPPED")
    client.force_login(users["bob"])
    r = client.post("/api/v1/containers/c2/check", {"trial": True}, content_type="application/json")
    assert r.status_code == 409 and "only a running container" in r.json()["error"]
    assert not Operation.objects.filter(kind="check").exists()
    r = client.post("/api/v1/containers/c2/check", {"trial": "yes"}, content_type="application/json")
    assert r.status_code == 400


def test_a_check_is_queued_for_an_operator_and_audited(
    db, trusted_host, client, users, django_capture_on_commit_callbacks
):
    Container.objects.create(name="c4", host=trusted_host, state="RUNNING")
    client.force_login(users["carol"])
    assert client.post("/api/v1/containers/c4/check", {}, content_type="application/json").status_code == 403
    client.force_login(users["bob"])
    r = client.post("/api/v1/containers/c4/check", {"trial": False}, content_type="application/json")
    assert r.status_code == 202, r.content
    op = Operation.objects.get(pk=r.json()["id"])
    assert (op.kind, op.params, op.container_name) == ("check", {"trial": False}, "c4")
    assert AuditEntry.objects.filter(action="container.check", user=users["bob"]).exists()


def test_the_api_and_pages_show_the_answer(db, trusted_host, client, users):
    Container.objects.create(
        name="c3", host=trusted_host, state="RUNNING",
        checkpointable={"status": "no", "reasons": [{"class": "files", "sentence": "Process 9 holds /x.",
                                                     "fix": "Close it."}], "checked_at": "2026-12-01T10:00:00"},
    )  # fmt: skip
    client.force_login(users["carol"])
    assert client.get("/api/v1/containers/c3/").json()["checkpointable"]["status"] == "no"
    row = next(r for r in client.get("/api/v1/containers/").json() if r["name"] == "c3")
    assert row["checkpointable"]["reasons"][0]["class"] == "files"
    page = client.get("/containers/c3/").content.decode()
    assert "blocked: Process 9 holds /x. — fix: Close it." in page
    assert "blocked: files" in client.get("/containers/").content.decode()


def test_a_container_that_was_checkpointable_and_is_blocked_now_is_reported(checking):
    run, _ = checking
    c = run({"reasons": [], "trial": {"ok": True, "frozen_ms": 100.0}})
    verified = c.checkpointable["verified_at"]
    c = run({"reasons": [PROCESSES], "trial": {"ok": False, "details": SESSION_LOG}})
    k = c.checkpointable
    assert k["status"] == "no" and k["newly_blocked"].startswith(
        f"c1 was checkpointable (verified {verified[:19]} UTC)"
    )
    assert "blocked now: Process 806 (sleep)" in k["newly_blocked"] and "Fix: Use setsid." in k["newly_blocked"]
    assert [e["message"] for e in c.op.events if e["phase"] == "blocked"] == [k["newly_blocked"]]
    entry = AuditEntry.objects.get(action="container.checkpointable_lost")
    assert entry.object_name == "c1" and f"check {c.op.pk}" in entry.detail
    # Blocked again: nothing new to report.
    c = run({"reasons": [PROCESSES], "trial": None})
    assert "newly_blocked" not in c.checkpointable
    assert AuditEntry.objects.filter(action="container.checkpointable_lost").count() == 1


def test_the_canary_checks_running_containers_whose_check_is_old_or_missing(db, trusted_host, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    trusted_host.status = "online"
    trusted_host.save()
    now = timezone.now()
    old = {"status": "yes", "checked_at": (now - timedelta(hours=30)).isoformat()}
    fresh = {"status": "yes", "checked_at": (now - timedelta(hours=2)).isoformat()}
    for name, state, k in [("a-never", "RUNNING", {}), ("b-old", "RUNNING", old), ("c-fresh", "RUNNING", fresh),
                           ("d-stopped", "STOPPED", {}), ("e-busy", "RUNNING", {})]:  # fmt: skip
        Container.objects.create(name=name, host=trusted_host, state=state, checkpointable=k)
    busy = Container.objects.get(name="e-busy")
    Operation.objects.create(kind="stop", status="running", container=busy, container_name="e-busy")
    queued = []
    monkeypatch.setattr(handlers, "enqueue", lambda op: queued.append(op.pk))
    assert handlers.canary_checks(24, now=now) == ["a-never", "b-old"]
    ops = Operation.objects.filter(kind="check").order_by("container_name")
    assert [(o.container_name, o.params) for o in ops] == [("a-never", {"trial": True, "auto": True}),
                                                           ("b-old", {"trial": True, "auto": True})]  # fmt: skip
    assert sorted(queued) == sorted(o.pk for o in ops)
    assert handlers.canary_checks(24, now=now) == []  # their checks are active now: not twice
    assert handlers.canary_checks(0, now=now + timedelta(days=9)) == []  # 0: off
    Operation.objects.filter(kind="check").update(status="success")
    later = now + timedelta(minutes=11)  # past the quiet minutes after those checks
    assert handlers.canary_checks(24, now=later, limit=1) == ["a-never"]  # at most `limit` per tick
