"""A migration's progress bar comes from one table per run (containers/migration/phases.py):
each table's shares make the whole bar, and a run reports progress that never goes back and
ends at 100, through the same phases the operation page shows. The hosts are replaced by
fake connections that answer every agent call (progress 0, 50, 100) and move no bytes; the
real runs are the lab tests (tests/migration/test_e2e_lab_*.py, tests/cli/test_cli_lab.py)."""

from contextlib import contextmanager

import pytest

from containers.migration import phases
from containers.migration.run import migrate
from containers.models import Container
from hosts import ssh
from hosts.models import Host
from operations.models import Operation
from operations.runner import OperationContext, OperationFailed, WaitFor

FOLLOW_UPS = {
    "roll-back": phases.ROLL_BACK,
    "recovery": phases.RECOVERY,
    "finish-pull": phases.FINISH_PULL,
    "resume-decision": phases.RESUME_DECISION,
    "lazy-resume": phases.LAZY_RESUME,
    "evacuation": phases.EVACUATION,
}
TIMED = ["preflight", "presync", "dump", "transfer", "restore", "pages", "cleanup"]  # result.phases, in order


@pytest.mark.parametrize("name", [*phases.STRATEGY_STEPS, *FOLLOW_UPS])
def test_every_table_shares_the_whole_bar_once(name):
    steps = phases.STRATEGY_STEPS.get(name) or FOLLOW_UPS[name]
    assert sum(s.share for s in steps) == 100
    assert all(s.share > 0 for s in steps)
    assert len({s.name for s in steps}) == len(steps)  # a step is named once


@pytest.mark.parametrize("strategy", ["stop-and-copy", "post-copy", "restart"])
def test_a_strategys_phases_come_in_the_order_they_are_timed(strategy):
    seen = list(dict.fromkeys(s.phase for s in phases.STRATEGY_STEPS[strategy]))
    assert seen == [p for p in TIMED if p in seen]
    assert ("pages" in seen) == (strategy == "post-copy")


def test_only_the_strategies_that_can_run_have_a_table():
    from containers.migration import STRATEGIES

    assert set(phases.STRATEGY_STEPS) == set(STRATEGIES) - {"auto", "pre-copy"}


class Conn:
    """A host's connection whose agent does each step at once (0, 50, 100 per cent)."""

    def __init__(self, host, calls, fail, lost=None):
        self.host, self.calls, self.fail, self.lost = host, calls, fail, lost

    def prestart_agent(self, sub):
        return ssh.Prestarted(sub, None)  # nothing waits: the call starts its own

    def run_agent(self, sub, params, on_event=None, timeout=None, prestarted=None):
        self.calls.append((self.host.name, sub))
        for p in (0, 50, 100):
            if on_event:
                on_event({"type": "event", "progress": p, "message": f"{sub} {p}%"})
        if sub == self.fail:
            raise ssh.AgentFailed(f"{sub} failed on purpose")
        if sub == self.lost:  # its answer never came (the link broke)
            raise ssh.AgentLost(f"{sub}: the connection was lost before the agent finished")
        return ssh.AgentResult(ANSWERS.get(sub, {}), "", 0)

    def stream(self, sub, params, who):
        return Stream(self, sub)

    def close(self):
        pass


class Stream:
    """A relay's end, started ahead (ssh.AgentProcess): told what to move when it begins."""

    def __init__(self, conn, sub):
        self.conn, self.sub = conn, sub

    def begin(self, params):
        self.conn.calls.append((self.conn.host.name, f"{self.sub} {params['what']}"))

    def close(self):
        pass


ANSWERS = {
    "migrate-prepare": {"state": "RUNNING", "need_bytes": 1, "snapshots": ["s1"], "has_saved_state": True},
    "migrate-dump": {"stats": {"frozen_ms": 1}, "pages_bytes": 4096, "relay": True},
    "migrate-restore": {"stats": {"restore_ms": 1}},
    "migrate-lazy-wait": {"done": True, "relay": {}},
    "migrate-resume": {"state": "RUNNING"},
    "start": {"state": "RUNNING"},
    "inspect": {"exists": True, "state": "FROZEN", "migration": {"lazy_dump": False}},
}


class Pump:
    bytes_down = bytes_up = rounds = 0
    last_progress = 0.0
    errors: list = []

    def __init__(self, *a, **kw):
        pass

    def start(self):
        return self

    def open_gate(self):
        pass

    def stop(self):
        pass


@pytest.fixture
def run(db, trusted_host, monkeypatch):
    net = {"network": {"subnet": "10.0.0.0/24", "bridge": "br0"}}
    Host.objects.filter(pk=trusted_host.pk).update(capabilities=net)
    target = Host.objects.create(
        name="h2", address="127.0.0.2", port=1, status="online", key_data="x", capabilities=net
    )
    c = Container.objects.create(name="c1", host=trusted_host, state="RUNNING")
    calls: list = []

    def go(strategy: str, fail: str | None = None, lost: str | None = None):
        @contextmanager
        def connect(host, timeout=None):
            yield Conn(host, calls, fail, lost)

        def relay(sender, receiver, on_bytes=None, timeout=3600):
            on_bytes(1)
            return 1, {}

        monkeypatch.setattr(ssh, "connect", connect)
        monkeypatch.setattr(ssh, "relay", relay)
        monkeypatch.setattr(ssh, "PagePump", Pump)
        op = Operation.objects.create(
            kind="migrate",
            status="running",
            container=c,
            container_name="c1",
            host=Host.objects.get(pk=trusted_host.pk),
            target_host=target,
            params={"strategy": strategy, "why": "asked for"},
        )
        ctx = OperationContext(op)
        try:
            outcome = migrate(ctx)
        except (OperationFailed, WaitFor) as e:
            outcome = e
        progress = [e["progress"] for e in op.events if "progress" in e]
        spans = [p for i, p in enumerate(e["phase"] for e in op.events) if i == 0 or op.events[i - 1]["phase"] != p]
        return outcome, progress, spans

    go.calls = calls
    return go


# The phases the operation page shows (each event's phase, consecutive ones as one span;
# here the agent's events name none, so they stay in the current one), as the migration
# reported them before its progress came from the tables (its events compared one by one
# with those of the code before, in 81 runs of this fake, when the tables came in).
SPANS = {
    "stop-and-copy": ["preflight", "transfer", "dump", "transfer", "restore", "cleanup"],
    "post-copy": ["preflight", "transfer", "dump", "transfer", "restore", "pages", "cleanup"],
    "restart": ["preflight", "transfer", "stop", "transfer", "restore", "cleanup"],
}


@pytest.mark.parametrize("strategy", ["stop-and-copy", "post-copy", "restart"])
def test_a_run_reports_progress_that_never_goes_back_and_ends_at_100(run, strategy):
    result, progress, spans = run(strategy)
    assert isinstance(result, dict) and result["strategy"] == strategy, result
    assert progress == sorted(progress), progress
    assert progress[-1] == 100
    assert spans == SPANS[strategy]
    assert list(result["phases"]) == [f"{p}_ms" for p in TIMED if p != "pages" or strategy == "post-copy"]


@pytest.mark.parametrize("fail", ["migrate-prepare", "migrate-dump", "migrate-restore"])
def test_a_failed_run_rolls_back_with_its_progress_still_going_forward(run, fail):
    error, progress, spans = run("stop-and-copy", fail)
    assert isinstance(error, OperationFailed) and f"{fail} failed on purpose" in error.message
    assert progress == sorted(progress), progress
    assert spans[-1] == "cleanup" and ("h2", "migrate-abort") in run.calls


@pytest.mark.parametrize("strategy", ["stop-and-copy", "post-copy"])
def test_a_roll_back_whose_resume_gets_no_answer_waits_and_keeps_the_dump(run, strategy):
    """The source was stopped, the restore failed, the target is clean, and the resume on the
    source gets no answer (its link still down): that is no refusal, so the operation waits to
    resume it later; it neither ends nor marks the container stopped without its memory (the
    full fault matrix's link-source 10 s cuts in the dump, on the lab)."""
    outcome, _, _ = run(strategy, fail="migrate-restore", lost="migrate-resume")
    assert isinstance(outcome, WaitFor), outcome
    assert "resuming it there got no answer" in str(outcome), str(outcome)
    assert ("h2", "migrate-abort") in run.calls and ("h1", "migrate-resume") in run.calls
    c = Container.objects.get(name="c1")
    assert c.state == "STOPPED" and c.has_saved_state is False  # waiting: nothing claimed ended or saved


def test_a_post_copy_whose_target_cannot_be_confirmed_clean_waits_with_the_decisions(run):
    """After the source was stopped, the target's clean-up got no answer: the lazy dump, which
    holds every page not yet pulled, must not be ended by a keep-state clean-up on the source;
    the operation waits with the post-copy decisions (the full matrix's link-target cuts in
    the restore, on the lab)."""
    outcome, _, _ = run("post-copy", fail="migrate-restore", lost="migrate-abort")
    assert isinstance(outcome, WaitFor), outcome
    assert [a["id"] for a in outcome.actions][:1] == ["postcopy-resume-source"], outcome.actions
    assert not [c for c in run.calls if c[1] in ("migrate-cleanup", "migrate-resume")], run.calls


@pytest.mark.parametrize("strategy", ["stop-and-copy", "restart"])
@pytest.mark.parametrize("target_answers", [True, False])
def test_an_admins_resume_on_the_source_removes_the_targets_copy_first(run, monkeypatch, strategy, target_answers):
    """The waiting roll-back's "Resume on the source": a target that answers again has what the
    migration left there removed before the source runs (never two copies, not even for a
    moment; the full matrix's link-target 10 s cuts in the dump found the copy still on lab-b
    after the decision); one that does not is recorded superseded, so the tidy removes its
    copy later and nothing ever resumes or follows it."""
    from containers.migration.decisions import resume_on_source

    fail = "migrate-restore" if strategy == "stop-and-copy" else "start"  # the target's last step fails
    outcome, _, _ = run(strategy, fail=fail, lost="migrate-abort")
    assert isinstance(outcome, WaitFor), outcome
    run.calls.clear()

    @contextmanager
    def connect(host, timeout=None):
        if host.name == "h2" and not target_answers:
            raise ssh.SSHError("h2 is unreachable")
        yield Conn(host, run.calls, None)

    monkeypatch.setattr(ssh, "connect", connect)
    op = Operation.objects.get(kind="migrate")
    with pytest.raises(OperationFailed) as e:
        resume_on_source(OperationContext(op))
    resumed = ("h1", "migrate-resume" if strategy == "stop-and-copy" else "start")
    assert resumed in run.calls, run.calls
    op.refresh_from_db()
    assert op.result["superseded"]["clean"] is target_answers
    if target_answers:
        assert run.calls.index(("h2", "migrate-abort")) < run.calls.index(resumed), run.calls
        assert "nothing is left on h2" in e.value.message
    else:
        assert ("h2", "migrate-abort") not in run.calls
        assert "is removed when ctweb next reaches it" in e.value.message
    assert Container.objects.get(name="c1").host.name == "h1"


def test_a_post_copy_roll_back_never_ends_the_lazy_dump_while_the_target_may_run_it(run):
    """Whoever calls the roll-back (the recovery after a lost worker did, without decisions to
    offer): a post-copy whose target cannot be confirmed clean waits, and the source's lazy
    dump, which holds every page not yet pulled, is left alone (the keep-state clean-up ended
    it after the full matrix's [post-copy-worker-restore]: the container was lost)."""
    from containers.migration.rollback import roll_back

    run("post-copy")  # a migration row and its hosts
    op = Operation.objects.get(kind="migrate")
    calls: list = []
    src, dst = Conn(op.host, calls, None), Conn(op.target_host, calls, "migrate-abort")
    c = Container.objects.get(name="c1")
    with pytest.raises(WaitFor) as e:
        roll_back(OperationContext(op), src, dst, c, {"name": "c1", "migration": op.pk}, True, True, True,
                  OperationFailed("h2 no longer runs c1's restored copy."))  # fmt: skip
    assert "nothing was removed on either host" in str(e.value)
    assert calls == [("h2", "migrate-abort")], calls  # nothing asked of the source
