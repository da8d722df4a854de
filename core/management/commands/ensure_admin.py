import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from core.roles import set_role


class Command(BaseCommand):
    help = "Create an admin account if none exists and print its login once."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")

    def handle(self, username, **options):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists() or User.objects.filter(groups__name="admin").exists():
            self.stdout.write(
                "An admin account exists already; its password was printed when it was made "
                "(lost it? .venv/bin/python manage.py changepassword USER)."
            )
            return
        password = secrets.token_urlsafe(12)
        user = User.objects.create_user(username=username, password=password, is_staff=True, is_superuser=True)
        set_role(user, "admin")
        self.stdout.write(f"Created the admin account. Log in as  {username}  /  {password}  (shown only this once).")
