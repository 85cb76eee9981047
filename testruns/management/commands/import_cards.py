from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from testruns.catalog.card_files import MAX_BYTES, CardFileError, import_cards
from testruns.models import PromptCard


class Command(BaseCommand):
    help = (
        "Import cards and test cases from YAML/JSON (our export format or a promptfoo config) "
        "and CSV files (test cases for --card). All files are imported, or none."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("files", nargs="+", metavar="FILE")
        parser.add_argument("--card", metavar="SLUG", help="The card that CSV files go into.")

    def handle(self, *args, files: list[str], card: str | None, **options) -> None:
        """1. Find the --card target. 2. Import every file in one transaction, collecting the
        errors of all of them. 3. Roll everything back if any file failed."""
        target = PromptCard.objects.filter(slug=card).first() if card else None
        if card and target is None:
            raise CommandError(f"No card with the slug {card!r}.")
        errors: list[str] = []
        summaries: list[str] = []
        with transaction.atomic():
            for path in files:
                try:
                    content = _read(path)
                    is_csv = Path(path).suffix.lower() == ".csv"
                    report = import_cards(content, filename=path, card=target if is_csv else None)
                except CardFileError as exc:
                    errors.extend(exc.errors)
                    continue
                summaries.append(f"{path}: {report.summary()}")
            if errors:
                # Raised inside the transaction, so the files that did import roll back too.
                raise CommandError("Nothing was imported.\n" + "\n".join(errors))
        self.stdout.write("\n".join(summaries))


def _read(path: str) -> bytes:
    # One byte over the limit is enough for import_cards to refuse the file, so a huge file
    # is never read into memory whole.
    try:
        with open(path, "rb") as file:
            return file.read(MAX_BYTES + 1)
    except OSError as exc:
        raise CardFileError([f"{path}: cannot be read: {exc.strerror}"]) from exc
