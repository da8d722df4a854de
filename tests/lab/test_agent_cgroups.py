"""The container's cgroup on a real lab host (cgroup v1, LXC 6): with the container's init
moved into <payload>/init.scope and another process into <payload>/system.slice/nested (what
systemd inside a container does with itself and its services), both are the container's
processes, for the frozen pass, the migration's held files and the freeze instant (hosts/agent cgroups.py). The v2 and
hybrid layouts are tested on this machine's cgroups in tests/agent/test_agent_cgroups.py.
Needs root. The container uses address .84 of the lab subnet."""

from __future__ import annotations

import json
import os

import pytest

from tests.support.criu import REMOTE_AGENT, agent, create, ssh, wait_for

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

NAME = "cg-nested"

# On the host: the container's init and its background sleep (host pids), moved as systemd
# would in every v1 hierarchy: the init into <payload>/init.scope, the sleep into
# <payload>/system.slice/nested; then every process in the container's pid namespace as /proc
# tells it (the truth the agent's list is held to). From the init's cgroup alone (what the
# agent read before) the sleep is not seen, and the init.scope's freezer is not the one
# lxc-freeze sets.
NEST = r"""
set -e
init=$(lxc-info -n {name} -pH)
sleep=$(for p in $(cat /proc/$init/task/*/children); do if [ "$(cat /proc/$p/comm)" = sleep ]; then echo $p; fi; done)
test -n "$sleep"
for h in /sys/fs/cgroup/*/; do
  mkdir -p "$h/lxc.payload.{name}/init.scope" "$h/lxc.payload.{name}/system.slice/nested"
  echo $init > "$h/lxc.payload.{name}/init.scope/cgroup.procs"
  echo $sleep > "$h/lxc.payload.{name}/system.slice/nested/cgroup.procs"
done
grep freezer /proc/$sleep/cgroup >&2
ns=$(readlink /proc/$init/ns/pid)
all=$(for d in /proc/[0-9]*; do if [ "$(readlink $d/ns/pid 2>/dev/null)" = "$ns" ]; then echo ${{d#/proc/}}; fi; done)
echo "{{\"init\": $init, \"sleep\": $sleep, \"all\": [$(echo $all | tr ' ' ',')]}}"
"""

ASK = (
    f"import json, sys; sys.path.insert(0, {REMOTE_AGENT!r}); from ctweb_agent import cgroups, downtime; "
    "n = sys.argv[1]; w = downtime.FreezeWatch(n); w.stop(); "
    "print(json.dumps({'cgroup': cgroups.container_cgroup(n), 'pids': cgroups.container_pids(n), 'watch': w.path}))"
)


def test_a_process_in_a_cgroup_nested_below_the_containers_is_found(lab, hosts):
    a = hosts[0]
    # no short-lived children (a counter's sleep would come and go between the two lists)
    create(lab, a, NAME, 84, command=["sh", "-c", "sleep 1000 & exec sleep 2000"])
    try:
        assert wait_for(lambda: ssh(lab, a, "lxc-info", "-n", NAME, "-pH", check=False).stdout.strip())
        nested = ssh(lab, a, "sh", "-c", NEST.format(name=NAME))
        assert f"lxc.payload.{NAME}/system.slice/nested" in nested.stderr.decode()
        truth = json.loads(nested.stdout.decode().splitlines()[-1])
        seen = json.loads(ssh(lab, a, "python3", "-c", ASK, NAME).stdout.decode())
        payload = f"/sys/fs/cgroup/freezer/lxc.payload.{NAME}"
        assert seen["cgroup"] == [payload, f"{payload}/freezer.state"]
        assert truth["sleep"] in seen["pids"] and truth["init"] in seen["pids"]
        assert seen["pids"] == sorted(truth["all"])
        assert seen["watch"] == f"{payload}/freezer.state"
    finally:
        agent(lab, a, "delete", {"name": NAME})
