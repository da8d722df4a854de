"""`manage.py lab up|down|status`: the local lab of namespaced LXC + CRIU hosts, registered
with the dashboard (keys pinned: the lab made them) and probed."""

import json
import os

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from containers.models import Container
from containers.services import create_container
from core.api import ApiError
from core.audit import Actor
from hosts import ssh
from hosts.models import Host
from lab import core
from operations import runner
from operations.models import Operation

DEMO_COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 1; done"
# A small TCP service: answers each connection with the container's name and a counter.
DEMO_SERVICE = (
    "import socket,itertools\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 7000)); s.listen()\n"
    "n=itertools.count(1)\n"
    "while True:\n"
    "    c,_=s.accept(); c.sendall(('hello from demo-debian #%d\\n' % next(n)).encode()); c.close()\n"
)
DEMOS = [
    ("demo-idle", "busybox", None),
    ("demo-counter", "busybox", ["sh", "-c", DEMO_COUNTER]),
    ("demo-debian", "debian", ["python3", "-c", DEMO_SERVICE]),
]


def lab_available() -> str | None:
    """None when the lab can run here, else why not."""
    if os.geteuid() != 0:
        return "the lab needs root (network, mount and pid namespaces)"
    if not os.path.exists("/proc/self/ns/net") or not os.path.exists("/proc/self/ns/pid"):
        return "this kernel has no namespaces"
    if not os.path.isdir("/sys/fs/cgroup"):
        return "no cgroup hierarchy is mounted"
    return None


class Command(BaseCommand):
    help = "Start, stop or show the local lab of LXC + CRIU hosts made of namespaces."

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["up", "down", "status"])
        parser.add_argument("--hosts", type=int, default=2)
        parser.add_argument("--demo", action="store_true", help="also create the demo containers")
        parser.add_argument("--json", action="store_true")

    def handle(self, action, hosts, demo, json, **options):
        if action == "status":
            return self.status(json)
        why = lab_available()
        if why:
            raise CommandError(f"The lab cannot run here: {why}.")
        try:
            if action == "down":
                return self.down()
            self.up(hosts, demo)
        except core.LabError as e:
            raise CommandError(str(e)) from e

    def say(self, msg: str) -> None:
        self.stdout.write(msg)
        self.stdout.flush()

    def up(self, n_hosts: int, demo: bool) -> None:
        # up() adds the dashboard's key to the keys already there (tests share the lab).
        started = core.up(n_hosts, authorized_key=ssh.public_key_line())
        for info in started:
            self._describe_network(core.hosts_dir() / info["name"] / "root")
            host = self._register(info)
            op = Operation.objects.create(kind=Operation.Kind.PROBE, host=host, phase="queued")
            status = runner.run_operation(op.pk, worker="manage.py lab")
            op.refresh_from_db()
            self.say(f"{host.name}: {host.address} probe {status}{': ' + op.error if op.error else ''}")
        if demo:
            self.demo([info["name"] for info in started])

    def _describe_network(self, root) -> None:
        # The agent reports this file in the probe; the dashboard assigns addresses from it.
        info = {"subnet": str(core.subnet()), "bridge": core.HOST_BRIDGE, "range": list(core.CONTAINER_RANGE)}
        path = root / "etc" / "ctweb" / "network.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info) + "\n")

    def _register(self, info: dict) -> Host:
        key_type, key_data = info["host_key"].split()[:2]
        pinned = ssh.key_from_parts(key_type, key_data)
        with transaction.atomic():
            host, _ = Host.objects.update_or_create(
                name=info["name"],
                defaults=dict(
                    address=info["address"],
                    port=info["port"],
                    username=info["username"],
                    is_lab=True,
                    key_type=key_type,
                    key_data=key_data,
                    fingerprint=ssh.fingerprint(pinned),
                    offered_key_type="",
                    offered_key_data="",
                    offered_fingerprint="",
                    status=Host.Status.TRUSTED,
                    status_message="",
                ),
            )
        return host

    def demo(self, host_names: list[str]) -> None:
        actor = Actor(get_user_model().objects.filter(is_superuser=True).first())  # the audit log names the admin

        for i, (name, template, command) in enumerate(DEMOS):
            if Container.objects.filter(name=name).exists():
                continue
            try:
                op = create_container(actor, name, host_names[i % len(host_names)], template, command, queue=False)
            except ApiError as e:
                self.say(f"{name}: not created: {e.detail}")
                continue
            status = runner.run_operation(op.pk, worker="manage.py lab")
            op.refresh_from_db()
            self.say(f"{name}: {status}{': ' + op.error.splitlines()[0] if op.error else ''}")

    def down(self) -> None:
        core.down()
        # The hosts' filesystems are gone, and their containers with them.
        lab_hosts = Host.objects.filter(is_lab=True)
        Container.objects.filter(host__in=lab_hosts).delete()
        lab_hosts.update(status=Host.Status.OFFLINE, status_message="The lab is down (manage.py lab up starts it).")
        self.say("lab is down")

    def status(self, as_json: bool) -> None:
        rows = core.status()
        if as_json:
            self.say(json.dumps(rows))
            return
        if not rows:
            self.say("the lab is not running")
        for r in rows:
            self.say(
                f"{r['name']}: {r['address']} {'running pid ' + str(r['pid']) if r['running'] else 'stopped'}"
                f"{' sshd ' + r['sshd'] if r.get('sshd') else ''}"
            )
