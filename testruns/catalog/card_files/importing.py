"""Import: read a file into specs, match them with the cards and cases stored, validate
everything with the models' own rules, then save it all or nothing."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ValidationError
from django.db import DataError, IntegrityError, transaction
from django.db.models import Max

from testruns.catalog.card_files.csv_cases import read_csv
from testruns.catalog.card_files.errors import fail
from testruns.catalog.card_files.ours import read_card
from testruns.catalog.card_files.parsing import decode, parse
from testruns.catalog.card_files.promptfoo import read_config
from testruns.catalog.card_files.reading import CardSpec, CaseSpec, Reader, at, kind_of
from testruns.catalog.cards import save_card
from testruns.models import PromptCard, TestCase

if TYPE_CHECKING:  # only for annotations: the user model is whatever AUTH_USER_MODEL names
    from django.contrib.auth.base_user import AbstractBaseUser

MAX_CASES = 10_000
CASE_FIELDS = ["name", "variables", "assertions", "threshold", "tags", "enabled"]


@dataclass
class ImportReport:
    """What an import did; "updated" counts only rows that changed."""

    cards_created: int = 0
    cards_updated: int = 0
    cards_unchanged: int = 0
    cases_created: int = 0
    cases_updated: int = 0
    cases_unchanged: int = 0
    versions_created: int = 0

    def summary(self) -> str:
        return (
            f"cards: {self.cards_created} created, {self.cards_updated} updated, "
            f"{self.cards_unchanged} unchanged; cases: {self.cases_created} created, "
            f"{self.cases_updated} updated, {self.cases_unchanged} unchanged; "
            f"{self.versions_created} new prompt versions"
        )


def import_cards(
    content: str | bytes,
    *,
    filename: str,
    user: AbstractBaseUser | None = None,
    card: PromptCard | None = None,
) -> ImportReport:
    """Create or update cards and their cases from a file; all or nothing.

    1. Decode and parse by extension: `.yaml`/`.yml`/`.json` define cards (our export, one
       card, or a promptfoo config); `.csv` holds test cases for `card`, which it requires.
    2. Read it into specs, collecting every problem of shape; stop if there are any.
    3. In one transaction, match cards by slug and cases by name and validate each with the
       model's full_clean; stop before any write if anything is invalid.
    4. Save, and snapshot a version of each saved card (a new one if its prompt changed).
    Raises CardFileError, and nothing else, for bad input.
    """
    reader, suffix = Reader(filename), Path(filename).suffix.lower()
    text = decode(content, filename)
    if suffix == ".csv":
        if card is None:
            raise fail(filename, "", "a CSV file holds test cases only; choose their card")
        specs = [CardSpec("", {}, read_csv(reader, text), existing=card)]
    elif suffix in (".yaml", ".yml", ".json"):
        if card is not None:
            raise fail(filename, "", "this file defines its own cards; import it without a card")
        specs = _read_document(reader, parse(text, suffix, filename), Path(filename).stem)
    else:
        raise fail(filename, "", "unknown file type; expected .yaml, .yml, .json or .csv")
    _check_limits(specs, reader)
    reader.stop_if_any()
    try:
        with transaction.atomic():
            plans = [_plan_card(spec, user, reader) for spec in specs]
            reader.stop_if_any()
            return _save(plans, user, f"Imported from {Path(filename).name}"[:300])
    except (IntegrityError, DataError) as exc:
        # Validation passed, so this is a concurrent import creating the same card, or a value
        # the database refuses that validation does not know about.
        raise fail(filename, "", f"could not be saved ({str(exc).splitlines()[0]})") from exc


def _read_document(reader: Reader, data: Any, stem: str) -> list[CardSpec]:
    """Which YAML or JSON document this is: our export (`cards:`), one card, or promptfoo's."""
    if isinstance(data, dict) and "cards" in data:
        if not isinstance(data["cards"], list):
            reader.add("cards", f"must be a list of cards, got a {kind_of(data['cards'])}")
            return []
        specs = [read_card(reader, item, at("cards", i)) for i, item in enumerate(data["cards"])]
        return [spec for spec in specs if spec is not None]
    if isinstance(data, dict) and data.keys() & {"name", "slug", "system_prompt"}:
        return [spec] if (spec := read_card(reader, data, "")) else []
    if isinstance(data, dict) and data.keys() & {"prompts", "tests"}:
        return read_config(reader, data, stem)
    reader.add(
        "",
        f"expected a mapping with `cards:`, a card or a promptfoo config; got a {kind_of(data)}",
    )
    return []


def _check_limits(specs: list[CardSpec], reader: Reader) -> None:
    """Too many cases, or two cards (or two cases of a card) that would upsert the same row."""
    if (count := sum(len(spec.cases) for spec in specs)) > MAX_CASES:
        reader.add("", f"{count} test cases is more than the limit of {MAX_CASES}")
    slugs = [(s.fields["slug"], s.field_where.get("slug", s.where)) for s in specs if s.fields]
    for slug, where, first in _repeats(slugs):
        reader.add(where, f"{slug!r} is already the slug of {first}")
    for spec in specs:
        names = [(case.fields["name"], case.field_where["name"]) for case in spec.cases]
        for name, where, first in _repeats(names):
            reader.add(where, f"{name!r} is already the name of {first}")


def _repeats(pairs: list[tuple[Any, str]]) -> Iterator[tuple[Any, str, str]]:
    """(value, where, where it came first) for each value that came before."""
    first: dict[str, str] = {}
    for value, where in pairs:
        if isinstance(value, str) and first.setdefault(value, where) != where:
            yield value, where, first[value]


@dataclass
class _Plan:
    card: PromptCard
    write_card: bool  # new, or a field changed
    created: bool
    new_cases: list[TestCase] = field(default_factory=list)
    changed_cases: list[TestCase] = field(default_factory=list)
    unchanged_cases: int = 0


def _assign(obj: PromptCard | TestCase, fields: dict[str, Any]) -> bool:
    """Set the fields; True when any changed. Compared as JSON, where true is not 1."""
    changed = False
    for name, value in fields.items():
        if json.dumps(getattr(obj, name), sort_keys=True) != json.dumps(value, sort_keys=True):
            setattr(obj, name, value)
            changed = True
    return changed


def _validate(
    obj: PromptCard | TestCase, spec: CardSpec | CaseSpec, reader: Reader, context: str = ""
) -> bool:
    """The model's full_clean, each message placed where the file gave the value. False when
    the prompt cannot even be parsed, so the cases need not be checked against it."""
    try:
        obj.full_clean(exclude=["card"] if isinstance(obj, TestCase) else None)
    except ValidationError as exc:
        for name, messages in exc.message_dict.items():
            for message in messages:
                reader.add(*_locate(spec, name, message, context))
        return not any(name in exc.message_dict for name in ("template", "system_prompt"))
    return True


def _locate(spec: CardSpec | CaseSpec, name: str, message: str, context: str) -> tuple[str, str]:
    if name == "assertions" and (match := re.match(r"assertion (\d+)\b", message)):
        if int(match[1]) <= len(spec.assert_where):
            return spec.assert_where[int(match[1]) - 1], message
    if name == "variables" and context:  # a shared test can miss different variables per card
        message = f"{message} (with {context})"
    return spec.field_where.get(name, spec.where), message


def _plan_card(spec: CardSpec, user: AbstractBaseUser | None, reader: Reader) -> _Plan:
    """Match the card by slug (or take the CSV's target) and the cases by name, then validate
    them as they will be saved. The card row is locked, so a concurrent import of it waits."""
    locked = PromptCard.objects.select_for_update()
    if spec.existing:
        card = locked.filter(pk=spec.existing.pk).first()
        if card is None:
            reader.add("", f"the card {spec.existing.slug} no longer exists")
            return _Plan(spec.existing, False, False)
    else:
        card = locked.filter(slug=spec.fields["slug"]).first()
    created = card is None
    card = card or PromptCard(owner=user)
    plan = _Plan(card, _assign(card, spec.fields) or created, created)
    if spec.fields and not _validate(card, spec, reader):
        return plan
    existing: dict[str, TestCase] = {}
    for case in (
        [] if created else card.cases.filter(name__in=[c.fields["name"] for c in spec.cases])
    ):
        existing.setdefault(case.name, case)  # a name already there twice: the first wins
    last = None if created else card.cases.aggregate(n=Max("order"))["n"]
    next_order = 0 if last is None else last + 1  # new cases go after the others, in file order
    for case_spec in spec.cases:
        case = existing.get(case_spec.fields["name"])
        if case is None:
            case, next_order = TestCase(card=card, order=next_order), next_order + 1
            plan.new_cases.append(case)
        case.card = card  # validate against the prompt as imported, not as stored
        if _assign(case, case_spec.fields) and case.pk:
            plan.changed_cases.append(case)
        elif case.pk:
            plan.unchanged_cases += 1
        _validate(case, case_spec, reader, spec.context)
    return plan


def _save(plans: list[_Plan], user: AbstractBaseUser | None, note: str) -> ImportReport:
    report = ImportReport()
    for plan in plans:
        if plan.write_card:
            # A new card has no versions yet (and cannot be asked before it is saved).
            latest = None if plan.created else plan.card.versions.aggregate(n=Max("number"))["n"]
            version = save_card(plan.card, user=user, note=note)
            report.versions_created += version.number != latest
        report.cards_created += plan.created
        report.cards_updated += plan.write_card and not plan.created
        report.cards_unchanged += not plan.write_card
        TestCase.objects.bulk_create(plan.new_cases, batch_size=500)
        TestCase.objects.bulk_update(plan.changed_cases, CASE_FIELDS, batch_size=500)
        report.cases_created += len(plan.new_cases)
        report.cases_updated += len(plan.changed_cases)
        report.cases_unchanged += plan.unchanged_cases
    return report
