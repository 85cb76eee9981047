from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from testruns.catalog.card_files import (
    MAX_BYTES,
    CardFileError,
    ImportReport,
    ProjectFiles,
    import_cards,
    import_project,
)
from testruns.catalog.card_files.project import CONFIG_NAMES, MAX_TOTAL_BYTES
from testruns.models import PromptCard


class Command(BaseCommand):
    help = (
        "Import cards and test cases from YAML/JSON (our export format or a promptfoo config), "
        "CSV files (test cases for --card), and promptfoo projects: a folder or a .zip with "
        "promptfooconfig.yaml files and the files they name with file://. All are imported, "
        "or none; cards that exist already change only with --update."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("files", nargs="+", metavar="FILE_OR_FOLDER")
        parser.add_argument("--card", metavar="SLUG", help="The card that CSV files go into.")
        parser.add_argument(
            "--update",
            action="store_true",
            help="Apply changes to cards that exist already (without it, they are listed and "
            "nothing is imported).",
        )
        parser.add_argument(
            "--strict",
            action="store_true",
            help="Refuse the import when any key, assertion or provider would not be imported.",
        )
        parser.add_argument(
            "--create-providers",
            action="store_true",
            help="Create the promptfoo providers that match none stored here, disabled, with "
            "the name of their key's variable only.",
        )

    def handle(self, *args, files: list[str], card: str | None, **options) -> None:
        """1. Find the --card target. 2. Import every file, folder or zip in one transaction,
        collecting the errors of all of them. 3. Roll everything back if any failed."""
        target = PromptCard.objects.filter(slug=card).first() if card else None
        if card and target is None:
            raise CommandError(f"No card with the slug {card!r}.")
        flags = {
            "update": options["update"],
            "strict": options["strict"],
            "create_providers": options["create_providers"],
        }
        errors: list[str] = []
        lines: list[str] = []
        with transaction.atomic():
            for path in files:
                try:
                    report = _import(path, target, flags)
                except CardFileError as exc:
                    errors.extend(exc.errors)
                    continue
                lines.append(f"{path}: {report.summary()}")
                lines += [f"  {line}" for line in report.details()]
            if errors:
                # Raised inside the transaction, so the files that did import roll back too.
                raise CommandError("Nothing was imported.\n" + "\n".join(errors))
        self.stdout.write("\n".join(lines))


def _import(path: str, target: PromptCard | None, flags: dict) -> ImportReport:
    if Path(path).is_dir():
        return import_project(ProjectFiles.from_folder(Path(path)), **flags)
    if Path(path).name in CONFIG_NAMES and Path(path).is_file():
        # A config named on its own still reads its file:// references from its folder.
        return import_project(ProjectFiles.for_config(Path(path)), **flags)
    suffix = Path(path).suffix.lower()
    limit = MAX_TOTAL_BYTES if suffix == ".zip" else MAX_BYTES
    return import_cards(
        _read(path, limit), filename=path, card=target if suffix == ".csv" else None, **flags
    )


def _read(path: str, limit: int) -> bytes:
    # One byte over the limit is enough for import_cards to refuse the file, so a huge file
    # is never read into memory whole.
    try:
        with open(path, "rb") as file:
            return file.read(limit + 1)
    except OSError as exc:
        raise CardFileError([f"{path}: cannot be read: {exc.strerror}"]) from exc
