"""`manage.py host prepare NAME`: prepare a trusted host in this process (the operation is the
same one the admin page and `POST /api/v1/hosts/NAME/prepare` start; its events are printed as
they come). Exit status 0 when the host is prepared and online, 1 otherwise.

`manage.py host sudoers NAME` prints the sudoers rules for the host's (non-root) SSH user;
`manage.py host sudo-setup NAME` prints the shell script an admin runs once as root on that
host to put sudo, the agent installer, the dashboard's signing key and those rules in place
(docs/HOSTS.md)."""

import threading
import time

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import close_old_connections

from core.api import ApiError
from core.audit import Actor
from hosts import ssh, sudo
from hosts.models import Host
from hosts.prepare import start_prepare
from operations import runner
from operations.models import Operation


class Command(BaseCommand):
    help = (
        "Host actions run from the command line: prepare NAME installs and checks what ctweb needs there; "
        "sudoers NAME and sudo-setup NAME print the sudo rules and the root setup for a non-root SSH user."
    )

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["prepare", "sudoers", "sudo-setup"])
        parser.add_argument("name")
        parser.add_argument("--subnet", help="the container network ctweb may give addresses in, e.g. 10.0.3.0/24")
        parser.add_argument("--bridge", default=None, help="the container bridge (default lxcbr0)")
        parser.add_argument("--range", default=None, help="first-last last octets of container addresses (100-250)")
        parser.add_argument("--gateway", default=None, help="the containers' gateway, an address of the subnet")

    def handle(self, action, name, subnet, bridge, range, gateway, **options):
        host = Host.objects.filter(name=name).first()
        if host is None:
            raise CommandError(f"No host named {name}.")
        if action in ("sudoers", "sudo-setup"):
            if not sudo.uses_sudo(host):
                raise CommandError(f"{name}'s SSH user is root: it needs no sudo rules.")
            if action == "sudoers":
                self.stdout.write(sudo.sudoers(host.username), ending="")
            else:
                self.stdout.write(sudo.setup_script(host.username, ssh.public_key_line()), ending="")
            return
        network = None
        if subnet or bridge or range or gateway:
            network = {"subnet": subnet}
            if bridge:
                network["bridge"] = bridge
            if range:
                first, sep, last = range.partition("-")
                if not (sep and first.isdigit() and last.isdigit()):
                    raise CommandError("--range must be FIRST-LAST, e.g. 100-250.")
                network["range"] = [int(first), int(last)]
            if gateway:
                network["gateway"] = gateway
        admin = get_user_model().objects.filter(is_superuser=True).order_by("pk").first()
        try:
            op = start_prepare(Actor(admin), host, network, queue=False)
        except ApiError as e:
            raise CommandError(str(e.detail)) from e
        self.stdout.write(f"operation {op.pk}: preparing {host.name}")
        status = self._run_and_follow(op.pk)
        op.refresh_from_db()
        if status != Operation.Status.SUCCESS:
            raise CommandError(op.error or f"The prepare ended {status}.")
        self.stdout.write(f"{host.name} is prepared and online.")

    def _run_and_follow(self, op_id: int) -> str | None:
        outcome = {}

        def run():
            try:
                outcome["status"] = runner.run_operation(op_id, worker="manage.py host prepare")
            finally:
                close_old_connections()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        shown = 0
        while True:
            alive = worker.is_alive()
            events = Operation.objects.filter(pk=op_id).values_list("events", flat=True).first() or []
            for e in events[shown:]:
                progress = f"{e['progress']:3d}% " if "progress" in e else "     "
                self.stdout.write(f"{progress}{e.get('phase', '')}: {e.get('message', '')}")
            shown = max(shown, len(events))
            if not alive:
                break
            time.sleep(0.5)
        return outcome.get("status")
