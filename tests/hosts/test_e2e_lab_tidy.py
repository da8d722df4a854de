"""The tidy on real hosts: the record follows the host. A migration's target restored the
container but the answer was lost (the record still names the source, the target keeps the
migration's working files): the next sync of the target asks the source, finds it does not
run the container, moves the record to the target (audited), shows the disagreement, and
deletes nothing; once the record names the host that runs it, the working files go."""

from __future__ import annotations

import pytest

from tests.support.faults import hosts_with, shell
from tests.support.lab import COUNTER, counter, create
from tests.support.stack import Api, ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]


def test_the_record_follows_the_host_that_runs_it_and_nothing_is_deleted(bob, lab):  # noqa: F811
    name = "tidy-follow"
    ok(create(bob, name=name, host="lab-a", command=["sh", "-c", COUNTER]))
    try:
        wait_for(lambda: counter(lab, "lab-a", name) > 2, 30, "counting")
        op = ok(
            run_op(bob, "POST", f"/api/v1/containers/{name}/migrate", {"target_host": "lab-b", "strategy": "restart"})
        )
        assert hosts_with(lab, name) == ["lab-b"]
        # The answer was lost: the database still names lab-a, lab-b kept the working files.
        bob.stack.python(
            f"from containers.models import Container; from hosts.models import Host; "
            f"Container.objects.filter(name='{name}').update(host=Host.objects.get(name='lab-a'))"
        )
        mdir = f"/var/lib/ctweb/migrations/{op['id']}"
        assert shell(lab, "lab-b", f"mkdir -m 700 -p {mdir} && echo kept > {mdir}/proof").returncode == 0
        assert bob.get(f"/api/v1/containers/{name}/").json()["host"] == "lab-a"
        before = counter(lab, "lab-b", name)

        first = ok(run_op(bob, "POST", "/api/v1/hosts/lab-b/sync"))
        # The tidy that made the record follow lab-b removed nothing there (a periodic refresh
        # after it may: the record now names lab-b, see below; so its result is asked, not the disk).
        assert op["id"] not in (first["result"].get("tidied_migrations") or []), first["result"]
        row = bob.get(f"/api/v1/containers/{name}/").json()
        assert (row["host"], row["state"]) == ("lab-b", "RUNNING"), row
        assert [d["migration"] for d in row["disagreements"]] == [op["id"]], row
        assert "the record now follows lab-b" in row["disagreements"][0]["sentence"], row
        host = bob.get("/api/v1/hosts/lab-b/").json()
        assert op["id"] in [d["migration"] for d in host["disagreements"]], host
        audited = bob.stack.python(
            "from core.models import AuditEntry; "
            "print(list(AuditEntry.objects.filter(action='container.follow_host').values_list('object_name', 'detail')))"
        )
        assert f"('{name}', 'migration {op['id']}: lab-a -> lab-b (RUNNING)')" in audited, audited
        # Nothing was stopped: it runs on.
        assert hosts_with(lab, name) == ["lab-b"]
        assert counter(lab, "lab-b", name) >= before

        # Now the record names the host that runs it: the next tidy removes the working files only.
        ok(run_op(bob, "POST", "/api/v1/hosts/lab-b/sync"))
        assert shell(lab, "lab-b", f"test -e {mdir}").returncode != 0
        assert hosts_with(lab, name) == ["lab-b"]
        wait_for(lambda: counter(lab, "lab-b", name) > before, 30, "it to keep counting")
    finally:
        if bob.get(f"/api/v1/containers/{name}/").status_code == 200:
            run_op(Api(bob.stack, bob.stack.tokens["bob"]), "DELETE", f"/api/v1/containers/{name}/")
