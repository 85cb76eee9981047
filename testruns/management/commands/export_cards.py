from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from testruns.catalog.card_files import export_cards
from testruns.models import PromptCard


class Command(BaseCommand):
    help = "Export cards with their test cases as YAML or JSON (all cards unless slugs given)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("slugs", nargs="*", metavar="SLUG")
        parser.add_argument(
            "--format",
            choices=["yaml", "json"],
            help="Default: json for an --output ending in .json, else yaml.",
        )
        parser.add_argument("--output", "-o", metavar="FILE", help="Default: standard output.")

    def handle(
        self, *args, slugs: list[str], format: str | None, output: str | None, **options
    ) -> None:
        fmt = format or ("json" if output and output.lower().endswith(".json") else "yaml")
        cards = PromptCard.objects.prefetch_related("cases")
        if slugs:
            # In the order given, so the file lists the cards as the command line does.
            by_slug = {card.slug: card for card in cards.filter(slug__in=slugs)}
            unknown = [slug for slug in slugs if slug not in by_slug]
            if unknown:
                raise CommandError(f"No card with the slug: {', '.join(unknown)}.")
            selected = [by_slug[slug] for slug in dict.fromkeys(slugs)]
        else:
            selected = list(cards.order_by("slug"))
        text = export_cards(selected, fmt)
        if output:
            Path(output).write_text(text, encoding="utf-8")
            self.stderr.write(f"Exported {len(selected)} cards to {output}.")
        else:
            self.stdout.write(text, ending="")
