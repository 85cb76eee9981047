"""Import: read a file (or a promptfoo project's folder or zip) into specs, match them with the
cards and cases stored, validate everything with the models' own rules, then save it all or
nothing. An import that would change a card already stored saves nothing unless asked to
`update`, and says what it would change; `strict` refuses an import that leaves anything out."""

from __future__ import annotations

import json
import posixpath
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ValidationError
from django.db import DataError, IntegrityError, transaction
from django.db.models import Max

from testruns.catalog.card_files.errors import CardFileError, fail
from testruns.catalog.card_files.ours import read_card
from testruns.catalog.card_files.parsing import decode, parse
from testruns.catalog.card_files.project import ProjectFiles
from testruns.catalog.card_files.promptfoo import ConfigRead, read_config, read_csv
from testruns.catalog.card_files.promptfoo_refs import Source
from testruns.catalog.card_files.reading import CardSpec, CaseSpec, Reader, at, kind_of
from testruns.catalog.card_files.report import UPDATE_HINT, ImportReport
from testruns.catalog.cards import save_card
from testruns.models import PromptCard, Provider, TestCase

if TYPE_CHECKING:  # only for annotations: the user model is whatever AUTH_USER_MODEL names
    from django.contrib.auth.base_user import AbstractBaseUser

MAX_CASES = 10_000
CASE_FIELDS = ["name", "variables", "assertions", "threshold", "tags", "enabled"]


@dataclass
class _Group:
    """The cards one file defines, with its reader and (a promptfoo config) what it read."""

    reader: Reader
    specs: list[CardSpec]
    config: ConfigRead | None = None


@dataclass
class Options:
    user: AbstractBaseUser | None = None
    update: bool = False
    strict: bool = False
    create_providers: bool = False


def import_cards(
    content: str | bytes,
    *,
    filename: str,
    user: AbstractBaseUser | None = None,
    card: PromptCard | None = None,
    update: bool = False,
    strict: bool = False,
    create_providers: bool = False,
) -> ImportReport:
    """Create or update cards and their cases from a file; all or nothing.

    1. By extension: `.zip` is a promptfoo project (import_project); `.yaml`/`.yml`/`.json`
       define cards (our export, one card, or a promptfoo config whose `file://` references
       cannot be read: there are no files beside it); `.csv` holds test cases for `card`.
    2. Read it into specs, collecting every problem of shape; stop if there are any.
    3. In one transaction, match cards by slug and cases by name and validate each with the
       model's full_clean; stop before any write if anything is invalid, or if stored cards
       would change and `update` is not given.
    4. Save, and snapshot a version of each saved card (a new one if its prompt changed).
    Raises CardFileError, and nothing else, for bad input.
    """
    options = Options(user, update, strict, create_providers)
    suffix = Path(filename).suffix.lower()
    if suffix == ".zip":
        if isinstance(content, str):
            raise fail(filename, "", "a zip file must be given as bytes")
        return import_project(ProjectFiles.from_zip(content, filename), **vars(options))
    reader = Reader(filename)
    text = decode(content, filename)
    if suffix == ".csv":
        if card is None:
            raise fail(filename, "", "a CSV file holds test cases only; choose their card")
        groups = [_Group(reader, [CardSpec("", {}, read_csv(reader, text), existing=card)])]
    elif suffix in (".yaml", ".yml", ".json"):
        if card is not None:
            raise fail(filename, "", "this file defines its own cards; import it without a card")
        groups = [_read_document(reader, parse(text, suffix, filename), Path(filename).stem)]
    else:
        raise fail(filename, "", "unknown file type; expected .yaml, .yml, .json, .csv or .zip")
    return _import(groups, options, f"Imported from {Path(filename).name}")


def import_project(files: ProjectFiles, **options: Any) -> ImportReport:
    """Every promptfoo config in a project (promptfooconfig.yaml, .yml or .json, at any depth),
    its `file://` references read relative to its folder; all or nothing, every problem of
    every config reported at once. A config without a description names its cards after its
    folder (with the folders above it when two configs' folders share a name)."""
    configs = files.configs()
    if not configs:
        raise CardFileError([f"{files.name}: no promptfooconfig.yaml, .yml or .json in it"])
    errors: list[str] = []
    skipped: list[str] = []
    groups = []
    for path, name in zip(configs, _config_names(files, configs), strict=True):
        reader = Reader(path, errors, skipped)
        try:
            data = parse(decode(files.read(path), path), PurePosixPath(path).suffix, path)
        except CardFileError as exc:
            errors.extend(exc.errors)
            continue
        if not isinstance(data, dict):
            reader.add("", f"a promptfoo config must be a mapping, got a {kind_of(data)}")
            continue
        source = Source(reader, files, posixpath.dirname(path))
        config = read_config(reader, data, name, source)
        groups.append(_Group(reader, config.cards, config))
    if errors:
        raise CardFileError(errors)
    return _import(groups, Options(**options), f"Imported from {files.name}")


def _config_names(files: ProjectFiles, configs: list[str]) -> list[str]:
    folders = [posixpath.dirname(path) for path in configs]
    names = [PurePosixPath(folder).name or files.name for folder in folders]
    repeated = {name for name, count in Counter(names).items() if count > 1}
    return [
        " ".join([files.name, *PurePosixPath(folder).parts]) if name in repeated else name
        for folder, name in zip(folders, names, strict=True)
    ]


def _read_document(reader: Reader, data: Any, stem: str) -> _Group:
    """Which YAML or JSON document this is: our export (`cards:`), one card, or promptfoo's."""
    if isinstance(data, dict) and "cards" in data:
        if not isinstance(data["cards"], list):
            reader.add("cards", f"must be a list of cards, got a {kind_of(data['cards'])}")
            return _Group(reader, [])
        specs = [read_card(reader, item, at("cards", i)) for i, item in enumerate(data["cards"])]
        return _Group(reader, [spec for spec in specs if spec is not None])
    if isinstance(data, dict) and data.keys() & {"name", "slug", "system_prompt"}:
        return _Group(reader, [spec] if (spec := read_card(reader, data, "")) else [])
    if isinstance(data, dict) and data.keys() & {"prompts", "tests"}:
        config = read_config(reader, data, stem)
        return _Group(reader, config.cards, config)
    reader.add(
        "",
        f"expected a mapping with `cards:`, a card or a promptfoo config; got a {kind_of(data)}",
    )
    return _Group(reader, [])


def _import(groups: list[_Group], options: Options, note: str) -> ImportReport:
    reader = groups[0].reader
    _check_limits(groups)
    reader.stop_if_any()
    report = ImportReport(not_imported=list(dict.fromkeys(reader.skipped)))
    if options.strict and report.not_imported:
        raise CardFileError(
            ["strict: nothing was imported, because these parts would be left out:"]
            + report.not_imported
        )
    try:
        with transaction.atomic():
            _providers(groups, options, report)
            plans = [_plan_card(spec, options.user, g.reader) for g in groups for spec in g.specs]
            reader.stop_if_any()
            report.changes = [line for plan in plans for line in plan.changes]
            if report.changes and not options.update:
                raise CardFileError([UPDATE_HINT, *report.changes])
            _save(plans, options.user, note[:300], report)
            return report
    except (IntegrityError, DataError) as exc:
        # Validation passed, so this is a concurrent import creating the same card, or a value
        # the database refuses that validation does not know about.
        raise fail(reader.filename, "", f"could not be saved ({str(exc).splitlines()[0]})") from exc


def _providers(groups: list[_Group], options: Options, report: ImportReport) -> None:
    """Name the stored provider each promptfoo provider id matches, list (or create, disabled)
    the others, and make a defaultTest's grader the cards' grader when it is stored."""
    seen: dict[str, Provider | None] = {}
    for group in groups:
        if group.config is None:
            continue
        refs = group.config.providers + ([group.config.grader] if group.config.grader else [])
        for ref in refs:
            if ref.id in seen:
                continue
            provider = seen[ref.id] = ref.find()
            if provider is not None:
                report.providers_found.append(f"{ref.id} is the provider {provider.name}")
            elif options.create_providers:
                new = ref.as_new_provider()
                try:
                    new.full_clean()
                except ValidationError as exc:
                    for message in exc.messages:
                        group.reader.add(ref.where, f"{ref.id} cannot be created: {message}")
                    continue
                new.save()
                report.providers_created.append(new.name)
            else:
                report.providers_missing.append(ref.describe())
        grader = group.config.grader
        if grader is not None and (provider := seen.get(grader.id)) is not None:
            for spec in group.specs:
                spec.fields["grader_provider_id"] = provider.pk


def _check_limits(groups: list[_Group]) -> None:
    """Too many cases, or two cards (or two cases of a card) that would upsert the same row,
    across every file of the import."""
    specs = [(group.reader, spec) for group in groups for spec in group.specs]
    if (count := sum(len(spec.cases) for _, spec in specs)) > MAX_CASES:
        groups[0].reader.add("", f"{count} test cases is more than the limit of {MAX_CASES}")
    slugs = [
        (s.fields["slug"], f"{r.filename}: {s.field_where.get('slug', s.where) or 'prompts'}")
        for r, s in specs
        if s.fields
    ]
    for slug, where, first in _repeats(slugs):
        file, _, place = where.partition(": ")
        first_file, _, first_place = first.partition(": ")
        first = first_place if first_file == file else first
        next(r for r, _ in specs if r.filename == file).add(
            place, f"{slug!r} is already the slug of {first}"
        )
    for reader, spec in specs:
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
    changes: list[str] = field(default_factory=list)  # what changes on a stored card


def _assign(obj: PromptCard | TestCase, fields: dict[str, Any]) -> list[str]:
    """Set the fields; the names of those that changed. Compared as JSON, where true is not 1."""
    changed = []
    for name, value in fields.items():
        if json.dumps(getattr(obj, name), sort_keys=True) != json.dumps(value, sort_keys=True):
            setattr(obj, name, value)
            changed.append(name)
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
    them as they will be saved, noting what changes on a stored card (new cases in the card a
    CSV was chosen for are what that import is for, not a change). The card row is locked, so
    a concurrent import of it waits."""
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
    changed = _assign(card, spec.fields)
    plan = _Plan(card, bool(changed) or created, created)
    if changed and not created:
        plan.changes.append(f"card {card.slug}: {', '.join(_shown(changed))}")
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
        changed = _assign(case, case_spec.fields)
        if changed and case.pk:
            plan.changed_cases.append(case)
            plan.changes.append(f"card {card.slug}: case {case.name!r}: {', '.join(changed)}")
        elif case.pk:
            plan.unchanged_cases += 1
        _validate(case, case_spec, reader, spec.context)
    if plan.new_cases and not created and not spec.existing:
        names = ", ".join(repr(case.name) for case in plan.new_cases[:5])
        more = f" and {len(plan.new_cases) - 5} more" if len(plan.new_cases) > 5 else ""
        plan.changes.append(f"card {card.slug}: {len(plan.new_cases)} new cases ({names}{more})")
    return plan


def _shown(fields: list[str]) -> list[str]:
    return ["grader provider" if name == "grader_provider_id" else name for name in fields]


def _save(
    plans: list[_Plan], user: AbstractBaseUser | None, note: str, report: ImportReport
) -> None:
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
