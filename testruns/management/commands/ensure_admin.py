from __future__ import annotations

import os
import secrets
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Make sure an admin superuser exists. A new one gets a generated password, "
        "printed once and kept in the password file (readable by the owner only)."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--username", default="admin")
        parser.add_argument("--password-file", required=True, type=Path)

    def handle(self, *args, username, password_file: Path, **options) -> None:
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        if user is None:
            password = secrets.token_urlsafe(12)
            User.objects.create_superuser(username=username, email="", password=password)
            password_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(password + "\n")
            self.stdout.write(f"Created admin user. Log in as {username} / {password}")
            self.stdout.write(f"(the password is kept in {password_file})")
        elif password_file.exists():
            self.stdout.write(f"Log in as {username}; the password is in {password_file}")
        else:
            self.stdout.write(f"Log in as {username} with the password you set.")
