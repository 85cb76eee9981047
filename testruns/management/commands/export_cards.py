from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from testruns.catalog.card_files import export_cards, export_promptfoo
from testruns.catalog.card_files.promptfoo_export import default_providers
from testruns.models import PromptCard, Provider


class Command(BaseCommand):
    help = (
        "Export cards with their test cases as YAML or JSON (all cards unless slugs given), or "
        "as a promptfoo project: `export_cards --format promptfoo DIR [SLUG ...]` writes "
        "DIR/promptfooconfig.yaml (and DIR/prompts/), which `promptfoo eval` runs."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("slugs", nargs="*", metavar="SLUG")
        parser.add_argument(
            "--format",
            choices=["yaml", "json", "promptfoo"],
            help="Default: json for an --output ending in .json, else yaml. With promptfoo, "
            "the first argument is the folder to write (unless --output names it).",
        )
        parser.add_argument("--output", "-o", metavar="FILE", help="Default: standard output.")
        parser.add_argument(
            "--provider",
            action="append",
            default=[],
            metavar="NAME",
            help="promptfoo: a provider for the config, by name (repeat for several). Default: "
            "the providers of the cards' latest runs.",
        )

    def handle(
        self, *args, slugs: list[str], format: str | None, output: str | None, **options
    ) -> None:
        fmt = format or ("json" if output and output.lower().endswith(".json") else "yaml")
        if fmt == "promptfoo":
            if not output and not slugs:
                raise CommandError("Name the folder to write: export_cards --format promptfoo DIR")
            output = output or slugs.pop(0)
        selected = _cards(slugs)
        if fmt == "promptfoo":
            self._promptfoo(selected, Path(output), options["provider"])
            return
        text = export_cards(selected, fmt)
        if output:
            Path(output).write_text(text, encoding="utf-8")
            self.stderr.write(f"Exported {len(selected)} cards to {output}.")
        else:
            self.stdout.write(text, ending="")

    def _promptfoo(self, cards: list[PromptCard], folder: Path, names: list[str]) -> None:
        providers = _providers(cards, names)
        files, notes = export_promptfoo(cards, providers)
        for path, text in files.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_text(text, encoding="utf-8")
        for note in notes:
            self.stderr.write(f"not exported: {note}")
        self.stderr.write(f"Exported {len(cards)} cards to {folder / 'promptfooconfig.yaml'}.")


def _cards(slugs: list[str]) -> list[PromptCard]:
    cards = PromptCard.objects.prefetch_related("cases").select_related("grader_provider")
    if not slugs:
        return list(cards.order_by("slug"))
    # In the order given, so the file lists the cards as the command line does.
    by_slug = {card.slug: card for card in cards.filter(slug__in=slugs)}
    unknown = [slug for slug in slugs if slug not in by_slug]
    if unknown:
        raise CommandError(f"No card with the slug: {', '.join(unknown)}.")
    return [by_slug[slug] for slug in dict.fromkeys(slugs)]


def _providers(cards: list[PromptCard], names: list[str]) -> list[Provider]:
    if names:
        by_name = {p.name: p for p in Provider.objects.filter(name__in=names)}
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise CommandError(f"No provider named: {', '.join(unknown)}.")
        return [by_name[name] for name in dict.fromkeys(names)]
    return default_providers(cards)
