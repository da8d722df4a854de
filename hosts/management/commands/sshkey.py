"""`manage.py sshkey`: make the fleet's SSH key while no host exists (scripts/setup.sh runs it),
and print its public half."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from hosts import ssh
from hosts.models import Host


class Command(BaseCommand):
    help = "Make the fleet's SSH key (only while no host exists) and print its public key."

    def handle(self, *args, **options):
        problem = ssh.key_problem()
        if problem is not None:
            if Host.objects.exists():
                raise CommandError(f"{problem}; hosts exist, so no new key is made: copy the fleet's key to this node.")
            if ssh.create_keypair():
                self.stderr.write(f"made the fleet's SSH key {settings.SSH_KEY_PATH}")
        self.stdout.write(ssh.public_key_line())
