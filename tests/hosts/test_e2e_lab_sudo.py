"""A non-root SSH user with sudo (issue 18 item 4, docs/HOSTS.md), on the lab: the bare host
lab-z gets a user `ctweb` with the dashboard's key, and a Host pointed at it as that user.
Without sudo, and then without the rules, probing and preparing it say in one sentence what to put
in place and change nothing; after the root setup `manage.py host sudo-setup` prints (run as root
on the host, as an admin would), it is prepared through sudo, runs containers, and a running
container migrates to it and back (the other host, lab-a, connects as root) with its memory
intact. The SSH user can neither write the installed agent nor install one of its own."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import time

import pytest

from tests.support.lab import PATTERN, counter, create, fingerprint, on_host, pattern
from tests.support.stack import Api, ok, run_op, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.lab]

USER = "ctweb"


def root_sh(lab, name: str, script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A shell script run as root on a lab host (its standard input), as an admin would."""
    return on_host(lab, name, "sh -s", input=script, timeout=timeout)


def as_user(lab, name: str, command: str, stdin: str = "/dev/null") -> subprocess.CompletedProcess:
    """`command` run on the host as the SSH user ctweb (what that user could do by itself)."""
    inner = f"cd && {command} < {shlex.quote(stdin)}"
    return on_host(lab, name, f"runuser -u {USER} -- sh -c {shlex.quote(inner)}")


def _ctwebs_things(lab, name: str) -> str:
    """What of ctweb's is on the host (compared before and after what must change nothing; the
    session's other prepare test may have prepared lab-z as root already)."""
    got = on_host(lab, name, "ls -laR /var/lib/ctweb /etc/ctweb; command -v criu lxc-start; dpkg -l | wc -l")
    return got.stdout + got.stderr


def test_a_non_root_ssh_user_with_the_sudo_rules_runs_everything_and_without_them_is_told_what_to_add(
    lab, lab_stack, bare, bob
):
    from lab import core

    alice = Api(lab_stack, lab_stack.tokens["alice"])
    name = bare["name"]
    key = lab_stack.dashboard_public_key()
    made = root_sh(
        lab,
        name,
        # sshd without PAM refuses a locked account: '*' is no password, and not locked.
        f"set -e\nid {USER} >/dev/null 2>&1 || useradd -m -s /bin/sh -p '*' {USER}\ninstall -d -o {USER} -g {USER} -m 0700 /home/{USER}/.ssh\n"
        f"echo {shlex.quote(key)} > /home/{USER}/.ssh/authorized_keys\n"
        f"chown {USER}:{USER} /home/{USER}/.ssh/authorized_keys\n",
    )
    assert made.returncode == 0, made.stderr

    r = alice.post("/api/v1/hosts/", json={"name": name, "address": bare["address"], "username": USER})
    assert r.status_code == 201, r.text
    r = alice.post(f"/api/v1/hosts/{name}/trust", json={"fingerprint": fingerprint(bare["host_key"])})
    assert r.status_code == 200, r.text
    network = {"subnet": str(core.subnet()), "bridge": core.HOST_BRIDGE, "range": list(core.CONTAINER_RANGE)}
    untouched = _ctwebs_things(lab, name)
    try:
        # No sudo on the host: one sentence, on the operation and on the host, and nothing made.
        probed = run_op(alice, "POST", f"/api/v1/hosts/{name}/probe")
        assert probed["status"] == "failure"
        assert probed["error"].startswith(f"{name} has no sudo, which its SSH user ctweb (not root) needs: "), probed
        assert "manage.py host sudo-setup" in probed["error"] and "Traceback" not in json.dumps(probed)
        assert alice.get(f"/api/v1/hosts/{name}/").json()["status_message"] == probed["error"]
        assert _ctwebs_things(lab, name) == untouched

        # sudo, but no rules for ctweb: the prepare refuses in one sentence and changes nothing.
        got = root_sh(
            lab, name, "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q sudo >/dev/null"
        )
        assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
        untouched = _ctwebs_things(lab, name)
        refused = run_op(alice, "POST", f"/api/v1/hosts/{name}/prepare", {"network": network})
        assert refused["status"] == "failure"
        assert refused["error"].startswith(
            f"sudo refused ctweb's agent installer on {name} for the SSH user ctweb (sudo: a password is required): "
            "add the rules of docs/HOSTS.md"
        ), refused["error"]
        assert "facts" not in [e["phase"] for e in refused["events"]]
        assert _ctwebs_things(lab, name) == untouched

        # The root setup, as `manage.py host sudo-setup` prints it, run as root on the host.
        script = lab_stack.manage("host", "sudo-setup", name)
        assert lab_stack.manage("host", "sudoers", name) in script
        done = root_sh(lab, name, script)
        assert done.returncode == 0, done.stdout + done.stderr
        assert on_host(lab, name, "visudo -c -f /etc/sudoers.d/ctweb").returncode == 0
        broken = on_host(lab, name, "sed 's/NOPASSWD:/NOPASSWD/' /etc/sudoers.d/ctweb > /tmp/s && visudo -c -f /tmp/s")
        assert broken.returncode == 1  # the check can fail
        assert on_host(
            lab, name, "stat -c '%U %a' /usr/local/sbin/ctweb-install-agent /etc/sudoers.d/ctweb"
        ).stdout.split() == [
            "root",
            "755",
            "root",
            "440",
        ]

        # The rules without the installer: its own sentence.
        aside = "/usr/local/sbin/ctweb-install-agent"
        assert on_host(lab, name, f"mv {aside} {aside}.aside").returncode == 0
        probed = run_op(alice, "POST", f"/api/v1/hosts/{name}/probe")
        assert on_host(lab, name, f"mv {aside}.aside {aside}").returncode == 0
        assert probed["status"] == "failure"
        assert probed["error"].startswith(f"The agent installer {aside} is missing on {name}: run the root setup"), (
            probed
        )

        t0 = time.monotonic()
        prepared = ok(run_op(alice, "POST", f"/api/v1/hosts/{name}/prepare", {"network": network}, timeout=900))
        print(f"\nprepare through sudo took {time.monotonic() - t0:.1f}s")
        facts = next(e for e in prepared["events"] if e["phase"] == "facts")
        assert facts and prepared["result"]["system"] == "Debian 13"
        assert prepared["result"]["packages"]["criu"].startswith("4.2")
        host = alice.get(f"/api/v1/hosts/{name}/").json()
        assert host["status"] == "online" and host["username"] == USER
        assert (host["capabilities"]["criu_check"], host["capabilities"]["uffd"]) == ("ok", True)

        # The agent is root's, and the SSH user can neither change it nor install one of its own.
        listing = on_host(lab, name, "stat -c '%U %a %n' /var/lib/ctweb /var/lib/ctweb/agent /var/lib/ctweb/agent/*")
        rows = [ln.split() for ln in listing.stdout.splitlines()]
        # (0600 from the installer; 0700 where a root prepare earlier in the session uploaded it)
        modes = [(user, mode) for user, mode, _ in rows]
        assert modes[:2] == [("root", "700")] * 2 and modes[2] in (("root", "600"), ("root", "700")), listing.stdout
        agent = rows[2][2]
        before = on_host(lab, name, f"sha256sum {agent}").stdout
        for attempt in (f"cp /bin/true {agent}", f"rm -f {agent}", "ls /var/lib/ctweb/agent", f"cat {agent}"):
            tried = as_user(lab, name, attempt)
            assert tried.returncode != 0 and "Permission denied" in tried.stderr, (attempt, tried)
        evil = "import os\nos.system('touch /pwned')\n"
        evil_name = f"ctweb-agent-{hashlib.sha256(evil.encode()).hexdigest()[:16]}.pyz"
        header = json.dumps(
            {"size": len(evil), "signature": "-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n"}
        )
        wrote = as_user(
            lab, name, f"printf '%s\\n%s' {shlex.quote(header)} {shlex.quote(evil)} > evil && cp evil evil.pyz"
        )
        assert wrote.returncode == 0, wrote.stderr
        own = as_user(lab, name, f"sudo -n /usr/local/sbin/ctweb-install-agent {evil_name}", stdin=f"/home/{USER}/evil")
        assert own.returncode == 1 and own.stdout == "send\n", own
        assert "The agent's signature does not verify against the dashboard's key" in own.stderr, own.stderr
        for cmd in (
            f"sudo -n /usr/bin/python3 /home/{USER}/evil.pyz probe",
            f"sudo -n /usr/bin/python3 {agent}/../../../../home/{USER}/evil.pyz probe",
            "sudo -n /usr/bin/python3 -c 'import os'",
            f"sudo -n /usr/local/sbin/ctweb-install-agent ../../../home/{USER}/{evil_name}",
            "sudo -n /bin/sh -c id",
        ):
            tried = as_user(lab, name, cmd)
            assert tried.returncode == 1 and "sudo: a password is required" in tried.stderr, (cmd, tried)
        assert on_host(lab, name, "test -e /pwned").returncode == 1
        # A PATH of the user's own: sudo keeps it unless secure_path is set (the shipped rules set
        # it, and the agent pins its own), so an lxc-ls of the user's never runs as root.
        planted = as_user(
            lab,
            name,
            "mkdir -p bin && printf '#!/bin/sh\\ntouch /pwned-path\\n' > bin/lxc-ls && chmod +x bin/lxc-ls && "
            f"PATH=$HOME/bin:$PATH sudo -n /usr/bin/python3 {agent} list",
        )
        assert planted.returncode == 0, planted
        assert on_host(lab, name, "test -e /pwned-path").returncode == 1
        assert on_host(lab, name, "ls /var/lib/ctweb/agent").stdout.split() == [agent.rsplit("/", 1)[1]]
        assert on_host(lab, name, f"sha256sum {agent}").stdout == before

        # Containers on it, through sudo: create (running), a snapshot, stop, start, delete. (Not a
        # stateful one: Debian's busybox template, which the prepare leaves as it is, runs gettys
        # on LXC ttys, and CRIU cannot dump those: "tty: Unable to find a master for /4". The
        # lab's full hosts patch the template; the container migrated below comes from one.)
        ok(create(bob, name="sudoct", host=name, command=["sh", "-c", "sleep 1000000"]))
        try:
            ok(run_op(bob, "POST", "/api/v1/containers/sudoct/snapshots/", {"name": "s1", "stateful": False}))
            for action in ("stop", "start"):
                ok(run_op(bob, "POST", "/api/v1/containers/sudoct/state", {"action": action}))
            assert bob.get("/api/v1/containers/sudoct/").json()["state"] == "RUNNING"
        finally:
            ok(run_op(bob, "DELETE", "/api/v1/containers/sudoct/"))

        # A debug bundle (root's, 0700) comes back through the agent, not SFTP.
        fetched = lab_stack.python(
            "import tempfile\nfrom pathlib import Path\nfrom hosts import ssh\nfrom hosts.models import Host\n"
            f"h = Host.objects.get(name={name!r})\n"
            "with ssh.connect(h) as c, tempfile.TemporaryDirectory() as d:\n"
            "    p = c.run_agent('bundle', {'op': 424242}).data['path']\n"
            "    n = c.fetch(p, Path(d) / 'b.tar.gz')\n"
            "    print('fetched', n, p)\n"
        )
        line = next(ln for ln in fetched.splitlines() if ln.startswith("fetched "))  # after shell's banner
        assert int(line.split()[1]) > 1000, fetched
        assert on_host(lab, name, "ls /var/lib/ctweb/bundles").stdout.split() == []

        # A running container migrates to it and back: post-copy there (the page pump's sessions
        # through sudo), stop-and-copy back; lab-a's SSH user is root.
        ok(create(bob, name="sudomove", host="lab-a", command=["sh", "-c", PATTERN]))
        try:
            drawn, _ = pattern(lab, "lab-a", "sudomove")
            for source, target, strategy in (("lab-a", name, "post-copy"), (name, "lab-a", "stop-and-copy")):
                before_count = counter(lab, source, "sudomove")
                moved = ok(
                    run_op(
                        bob,
                        "POST",
                        "/api/v1/containers/sudomove/migrate",
                        {"target_host": target, "strategy": strategy},
                        timeout=300,
                    )
                )
                assert moved["result"]["strategy"] == strategy
                row = bob.get("/api/v1/containers/sudomove/").json()
                assert (row["host"], row["state"]) == (target, "RUNNING")
                after = counter(lab, target, "sudomove")
                assert before_count <= after <= before_count + 30, (before_count, after)
                wait_for(lambda: counter(lab, target, "sudomove") > after, 15, "it to go on")  # noqa: B023
                assert pattern(lab, target, "sudomove") == (drawn, drawn)  # the same memory, intact
                assert "sudomove" not in on_host(lab, source, "lxc-ls", "-1").stdout
        finally:
            run_op(bob, "DELETE", "/api/v1/containers/sudomove/")

        # The rules taken away again: one sentence on the host, and the agent stays as it was.
        assert on_host(lab, name, "rm /etc/sudoers.d/ctweb").returncode == 0
        probed = run_op(alice, "POST", f"/api/v1/hosts/{name}/probe")
        assert probed["status"] == "failure"
        assert probed["error"].startswith(f"sudo refused ctweb's agent installer on {name} for the SSH user ctweb"), (
            probed
        )
        host = alice.get(f"/api/v1/hosts/{name}/").json()
        assert (host["status"], host["status_message"]) == ("offline", probed["error"])
        assert on_host(lab, name, f"sha256sum {agent}").stdout == before
    finally:
        r = alice("DELETE", f"/api/v1/hosts/{name}/")
        assert r.status_code in (204, 404), r.text
