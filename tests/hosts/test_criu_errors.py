"""Failures explained: CRIU's error lines -> one class, a sentence and a fix (hosts/criu_errors.py),
kept as the failed operation's result.explanation and shown first on its page.

LAB lines were printed by CRIU 4.1.1 / LXC 6.0.4 on the lab when the failure was forced
(tests/containers/test_e2e_lab_explained.py forces some again through the dashboard);
SOURCE lines are CRIU's messages (4.x source) in the format its log writes them, for the
classes the lab cannot force (another CPU, a missing kernel feature, ...)."""

from html import escape

import pytest

from hosts import criu_errors
from hosts.criu_errors import CATALOGUE, classify_line, error_lines, explain
from operations import runner
from operations.models import Operation
from operations.runner import OperationFailed, handler

# (class, excerpt of an agent's `details` as it reached the dashboard)
LAB = [
    # iptables-restore replaced by /bin/false in lab-a's mount namespace, stateful stop
    ("network-lock", "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
     "Error (criu/util.c:657): exited, status=1\nError (criu/util.c:657): exited, status=1\n"
     "Error (criu/net.c:3436): net: Locking network failed: iptables-restore returned -1. This may be connected to "
     "disabled CONFIG_NETFILTER_XT_MARK kernel build config option.\nError (criu/util.c:657): exited, status=1\n"
     "Error (criu/cr-dump.c:1975): Dumping FAILED.\n--- lxc-checkpoint ---\n"
     "lxc-checkpoint: xp-net: ../src/lxc/criu.c: do_dump: 1297 dump failed with 1\n"
     "lxc-checkpoint: xp-net: ../src/lxc/tools/lxc_checkpoint.c: checkpoint: 182 Checkpointing xp-net failed"),
    # the saved-state directory on a 1 MiB tmpfs, a container holding 6 MB, stateful stop
    ("disk", "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
     "Error (criu/page-xfer.c:263): page-xfer: Unable to spice data: No space left on device\n"
     "Error (criu/bfd.c:131): bfd: Error flushing image: No space left on device\n"
     "Error (criu/mem.c:718): Can't dump page with parasite\n"
     "Error (criu/cr-dump.c:1975): Dumping FAILED.\n--- lxc-checkpoint ---\n"
     "lxc-checkpoint: xp-disk: ../src/lxc/criu.c: do_dump: 1297 dump failed with 1"),
    # a daemon left by `lxc-attach -- sh -c 'sleep 1000 &'` (no setsid), trial dump
    ("processes", "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
     "Warn  (compel/arch/x86/src/lib/infect.c:419): Will restore 806 with interrupted system call\n"
     "Error (criu/cr-dump.c:1528): A session leader of 806(13) is outside of its pid namespace\n"
     "Error (criu/cr-dump.c:1975): Dumping FAILED."),
    # the same with setsid, the daemon holding the host's /etc/hostname as fd 3, trial dump
    ("files", "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
     "Warn  (compel/arch/x86/src/lib/infect.c:419): Will restore 1235 with interrupted system call\n"
     "Error (criu/files-reg.c:1790): Can't lookup mount=92 for fd=3 path=/etc/hostname\n"
     "Error (criu/cr-dump.c:1545): Dump files (pid: 1235) failed with -1\nError (criu/cr-dump.c:1975): Dumping FAILED."),
    # `unshare -u sleep 1000` inside the container, stateful stop
    ("namespaces", "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
     "Error (criu/namespaces.c:460): Can't dump nested uts namespace for 1635\n"
     "Error (criu/namespaces.c:721): Can't make utsns id\nError (criu/util.c:657): exited, status=1\n"
     "Error (criu/cr-dump.c:1975): Dumping FAILED.\n--- last lines of dump.log ---\n"
     "iptables-restore: line 3 failed: Bad rule (does a matching rule exist in that chain?).\n--- lxc-checkpoint ---\n"
     "lxc-checkpoint: xp-nested: ../src/lxc/tools/lxc_checkpoint.c: checkpoint: 182 Checkpointing xp-nested failed"),
    # restore of a saved state after a file its init held open was moved away (test_agent_criu.py)
    ("files", "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
     "Warn  (criu/cr-restore.c:1050): Set CLONE_PARENT | CLONE_NEWPID but it might cause restore problem,because "
     "not all kernels support such clone flags combinations!\n"
     "Error: ipv4: Address already assigned.\nError: ipv6: address already assigned.\n"
     "     1: Error (criu/files-reg.c:2353): Can't open file data/held on restore: No such file or directory\n"
     "     1: Error (criu/files-reg.c:2267): Can't open file data/held: No such file or directory\n"
     "     1: Error (criu/files.c:1221): Unable to open fd=3 id=0x3\n"
     "Error (criu/cr-restore.c:2331): Restoring FAILED.\n"
     "Error (criu/cgroup.c:2055): cg: cgroupd: recv req error: No such file or directory"),
    # a migration of a container with an lxc.mount.entry bind mount from lab-a: lab-b's restore
    ("mounts", "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
     "Error (criu/mount.c:3141): mnt: No mapping for 216:(null) mountpoint\n"
     "Error (criu/cgroup.c:2055): cg: cgroupd: recv req error: No such file or directory\n--- lxc-checkpoint ---\n"
     "lxc-checkpoint: why-dst: ../src/lxc/criu.c: do_restore: 1070 criu process exited 1, output:"),
]  # fmt: skip

SOURCE = [
    ("sockets", "(00.083010) Error (criu/sk-inet.c:167): inet: Can't dump 2 inet socket 1a2b3. Only stream, dgram "
     "and raw are supported."),
    ("sockets", "(00.083010) Error (criu/sk-inet.c:200): inet: Connected TCP socket, consider using "
     "--tcp-established option."),
    ("processes", "(00.052000) Error (criu/cr-dump.c:1681): A session leader of 215(3) is outside of its "
     "pid namespace"),
    ("files", "(00.010000) Error (criu/files-reg.c:1790): Can't lookup mount=58 for fd=3 path=/etc/hostname"),
    ("files", "(00.010000) Error (criu/files-ext.c:98): Can't dump file 5 of that type [20666] (unknown /dev/nvidia0)"),
    ("mounts", "(00.020000) Error (criu/mount.c:3120): mnt: Mount 112:/srv is autodetected external mount. "
     "Try \"--ext-mount-map auto\" to allow them."),
    ("namespaces", "(00.030000) Error (criu/namespaces.c:460): Can't dump nested uts namespace for 311"),
    ("tty", "(00.040000) Error (criu/tty.c:1010): tty: Don't have tty to inherit session from, aborting"),
    ("cgroups", "(00.050000) Error (criu/seize.c:635): Unable to freeze cgroup /sys/fs/cgroup/freezer/lxc/c1 "
     "(10 x 100ms attempts, timeout: 10s)"),
    ("cpu", "(00.060000) Error (criu/arch/x86/cpu.c:247): FPU feature required by image is not supported on host "
     "(fpu:0 fxsr:0 osxsave:1 xsaves:0)"),
    ("kernel", "(00.000500) Error (criu/vdso.c:300): vdso: Unexpected rt vDSO area bounds"),
    ("kernel", "(00.300000) Error (criu/page-pipe.c:90): page-pipe: tee: 65536: Operation not permitted"),
    ("security", "(00.070000) Error (criu/lsm.c:406): apparmor LSM specified but apparmor not supported by kernel"),
    ("sockets", "(00.080000) Error (criu/sk-unix.c:428): unix: Unix socket 4242 with unreachable peer 4243 (4243)"),
    ("network-lock", "(00.061000) Error (criu/net.c:3308): Locking network failed using nftables"),
    # no known words: the source file it comes from says what it is about
    ("sockets", "(00.090000) Error (criu/sk-queue.c:200): queue: recvmsg: Bad address"),
]  # fmt: skip


@pytest.mark.parametrize("cls,text", LAB + SOURCE)
def test_each_recorded_failure_gets_its_class_sentence_and_fix(cls, text):
    found = explain(text)
    assert found is not None and found["class"] == cls, found
    entry = next(c for c in CATALOGUE if c.key == cls)
    assert (found["sentence"], found["fix"], found["label"]) == (entry.sentence, entry.fix, entry.label)
    assert found["line"] in text and not found["line"].startswith("(")  # CRIU's timestamp dropped


def test_every_class_the_issue_names_is_in_the_catalogue_and_has_a_recorded_line():
    named = {"mounts", "network-lock", "cgroups", "tty", "files", "sockets", "cpu", "kernel", "disk"}
    assert named <= set(criu_errors.CLASSES)
    assert set(criu_errors.CLASSES) == {cls for cls, _ in LAB + SOURCE}
    for c in CATALOGUE:
        assert c.sentence.endswith(".") and c.fix.endswith(".") and len(c.sentence) < 300 and len(c.fix) < 300


def test_the_first_error_line_is_the_cause_and_the_noise_is_skipped():
    text = (
        "(00.000391) Error (criu/util.c:659): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
        "(00.010000) Warn  (criu/sk-unix.c:100): unix: a tty warning that explains nothing\n"
        "(00.020000) Error (criu/files-reg.c:1790): Can't lookup mount=58 for fd=3 path=/etc/hostname\n"
        "(00.030000) Error (criu/image.c:845): Can't write img file: No space left on device\n"
    )
    assert [line.split(":")[0] for line in error_lines(text)] == ["Error (criu/files-reg.c", "Error (criu/image.c"]
    assert explain(text)["class"] == "files"


def test_a_restore_failure_is_read_from_its_first_known_line_without_the_pid_prefix():
    found = explain(LAB[5][1])
    assert (
        found["line"]
        == "Error (criu/files-reg.c:2353): Can't open file data/held on restore: No such file or directory"
    )


def test_unknown_or_empty_logs_are_not_explained():
    assert explain("") is None
    assert explain("(00.1) Error (criu/cr-dump.c:2111): Dumping FAILED.\nall fine otherwise") is None
    assert explain("criu: a line that merely mentions a socket, with no error word") is None
    assert classify_line("Dumping FAILED.") is None


def test_a_hostile_log_is_cut_and_never_breaks_the_classifier():
    long = "Error (criu/x.c:1): " + "A" * 100_000
    assert len(error_lines(long)[0]) == 500
    many = "\n".join(["(0.1) Error (criu/x.c:1): nothing known"] * 5000 + ["Error: No space left on device"])
    assert explain(many) is None  # past the lines looked at: not the cause anyway


# --- the runner keeps it, the page shows it first ---------------------------------------------


@pytest.fixture
def kinds():
    saved = dict(runner.HANDLERS)
    yield runner.HANDLERS
    runner.HANDLERS.clear()
    runner.HANDLERS.update(saved)


def _fail_with(details, host=""):
    @handler("sync")
    def job(ctx):
        raise OperationFailed("lab-a: CRIU could not dump and stop c1 (lxc-checkpoint exit status 1).", details,
                              {"state": "RUNNING"}, host=host)  # fmt: skip

    op = Operation.objects.create(kind="sync")
    assert runner.run_operation(op.pk) == "failure"
    op.refresh_from_db()
    return op


def test_a_failed_operation_carries_the_explanation_and_keeps_its_error(db, kinds):
    op = _fail_with(LAB[0][1], host="lab-a")
    x = op.result["explanation"]
    assert (x["class"], x["host"]) == ("network-lock", "lab-a")
    assert x["line"].startswith("Error (criu/net.c:3436): net: Locking network failed: iptables-restore returned -1.")
    assert op.result["state"] == "RUNNING"
    assert op.error.startswith("lab-a: CRIU could not dump and stop c1") and "criu/net.c:3436" in op.error


def test_an_unexplained_failure_has_no_explanation(db, kinds):
    op = _fail_with("(00.1) Error (criu/cr-dump.c:2111): Dumping FAILED.")
    assert "explanation" not in op.result and op.status == "failure"


def test_an_explainer_that_crashes_does_not_change_the_failure(db, kinds, monkeypatch):
    def broken(op, e):
        raise RuntimeError("bug")

    monkeypatch.setattr(runner, "EXPLAINERS", [broken, *runner.EXPLAINERS])
    op = _fail_with(LAB[0][1])
    assert op.status == "failure" and op.result["explanation"]["class"] == "network-lock"


def test_the_operation_page_shows_the_sentence_and_fix_before_the_error(db, kinds, client, users):  # noqa: F811
    op = _fail_with(LAB[1][1], host="lab-b")
    client.force_login(users["carol"])
    html = client.get(op.get_absolute_url()).content.decode()
    entry = next(c for c in CATALOGUE if c.key == "disk")
    top = html.index('id="op-explained"')
    assert top < html.index('id="op-status"') < html.index('id="op-error"')
    assert html.index(escape(entry.sentence)) > top and "Why it failed: disk on lab-b" in html
    assert f"<b>Fix:</b> {escape(entry.fix)}" in html
    assert "page-xfer: Unable to spice data: No space left on device" in html


def test_the_page_escapes_what_a_host_sent(db, kinds, client, users):  # noqa: F811
    op = _fail_with("(0.1) Error (criu/sk-inet.c:1): inet socket <script>alert(1)</script>")
    client.force_login(users["carol"])
    html = client.get(op.get_absolute_url()).content.decode()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
