from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand

from testruns.catalog.demo import seed_demo


class Command(BaseCommand):
    help = "Create or refresh the demo provider, cards and test cases (idempotent)."

    def handle(self, *args, **options) -> None:
        seed_demo(settings.MAX_CONCURRENT_RUNS)
        self.stdout.write("Demo data is in place.")
