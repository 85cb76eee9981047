"""Cards and their test cases as files, in promptfoo's format extended with what a card has:

    cards:
      - {name, slug, description, tags, system_prompt, prompts: [<template>], tests: [
          {description: <case name>, vars, assert, threshold?, tags?, enabled: false?}]}

Import also reads one card without the `cards:` wrapper, a promptfoo config (one card per
prompt, every card gets every test) and promptfoo's CSV of test cases for a chosen card. It is
all or nothing, and every problem names the file and its place (`tests[3].assert[0]`, `row 5`).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from django.core.exceptions import ValidationError
from django.db import DataError, IntegrityError, transaction
from django.db.models import Max
from django.utils.text import slugify

from testruns.catalog.assertions import ASSERTION_TYPES
from testruns.engine.services import snapshot_version
from testruns.models import PromptCard, TestCase

MAX_BYTES = 5 * 1024 * 1024
MAX_CASES = 10_000
# YAML aliases let a small file expand into a huge document ("billion laughs"); counting nodes
# while copying it stops that long before memory runs out.
MAX_NODES = 1_000_000
MAX_DEPTH = 100
# PostgreSQL stores neither; JSON's \u0000 and lone \ud800 escapes can produce them.
UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")
KINDS = {bool: "boolean", int: "number", float: "number", str: "string", list: "list"}
KINDS |= {dict: "mapping", type(None): "null"}
CASE_FIELDS = ["name", "variables", "assertions", "threshold", "tags", "enabled"]
CARD_KEYS = {"name", "slug", "description", "tags", "system_prompt", "prompts", "tests"}
LIST_VAR_MESSAGE = (
    "promptfoo runs a test once per item of a list; that is not supported here: "
    "write one test per value"
)
# promptfoo's `options` and `metadata` are accepted and ignored: nothing here reads them.
TEST_KEYS = {"description", "vars", "assert", "threshold", "tags", "enabled", "options", "metadata"}
TEST_FIELD_KEYS = {"name": "description", "variables": "vars", "threshold": "threshold"}
TEST_FIELD_KEYS |= {"tags": "tags", "enabled": "enabled"}
# CSV short forms (`contains: foo`) know promptfoo's types too, so that one we lack is reported
# as unsupported instead of silently becoming an `equals` of the whole text.
SHORT_FORM_TYPES = {t.removeprefix("not-") for t in ASSERTION_TYPES} | {
    "answer-relevance", "bleu", "classifier", "contains-html", "contains-json", "contains-sql",
    "contains-xml", "context-faithfulness", "context-recall", "context-relevance", "factuality",
    "g-eval", "icontains-all", "icontains-any", "is-html", "is-refusal", "is-sql", "is-xml",
    "meteor", "moderation", "perplexity", "perplexity-score", "rouge-n", "similar",
}  # fmt: skip
CODE_TYPES = {"javascript", "fn", "eval", "python", "ruby", "webhook", "file"}
CSV_SPECIAL_COLUMN = re.compile(r"__(description|threshold|expected\d*)")
SHORT_FORM = re.compile(r"(not-)?([a-z][a-z0-9-]*)(\(\d+(?:\.\d+)?\))?(?::\s*(.*))?", re.S)
LIST_VALUED = {"contains-any", "contains-all", "icontains-any", "icontains-all"}
JSON_VALUED = {"is-json", "json-schema", "json-path", "levenshtein", "word-count", "latency"}


class CardFileError(Exception):
    """Bad input; every message names the file and the place in it."""

    def __init__(self, errors: list[str]):
        self.errors = list(dict.fromkeys(errors))  # a shared test fails once, not per card
        super().__init__("\n".join(self.errors))


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


# -- Export ----------------------------------------------------------------------------------


class _BlockDumper(yaml.SafeDumper):
    """Block style, with list items indented under their key as promptfoo's docs write them."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line text as a `|` block; PyYAML quotes it instead when a block cannot hold it
    # exactly (trailing spaces, control characters).
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def _ordered(value: Any, first: tuple[str, ...] = ()) -> Any:
    """Keys in a fixed order (`first`, then sorted) at every level, so exports diff well."""
    if isinstance(value, dict):
        keys = [k for k in first if k in value] + sorted(k for k in value if k not in first)
        return {key: _ordered(value[key]) for key in keys}
    return [_ordered(item) for item in value] if isinstance(value, list) else value


def _test_document(case: TestCase) -> dict[str, Any]:
    doc = {"description": case.name, "vars": _ordered(case.variables)}
    doc["assert"] = [_ordered(spec, ("type", "value", "weight")) for spec in case.assertions]
    if case.threshold is not None:
        doc["threshold"] = case.threshold
    if case.tags:
        doc["tags"] = list(case.tags)
    if not case.enabled:
        doc["enabled"] = False
    return doc


def _card_document(card: PromptCard) -> dict[str, Any]:
    keys = ("name", "slug", "description", "tags", "system_prompt")
    doc = {key: getattr(card, key) for key in keys} | {"prompts": [card.template]}
    return doc | {"tests": [_test_document(case) for case in card.cases.all()]}


def export_cards(cards: Iterable[PromptCard], fmt: str) -> str:
    """The cards in the order given, each with its cases in case order; fmt is yaml or json."""
    doc = {"cards": [_card_document(card) for card in cards]}
    if fmt == "json":
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if fmt == "yaml":
        options = {"sort_keys": False, "allow_unicode": True, "width": sys.maxsize}
        return yaml.dump(doc, Dumper=_BlockDumper, **options)
    raise ValueError(f"Unknown format {fmt!r}; expected yaml or json.")


# -- Reading a file into specs ---------------------------------------------------------------


@dataclass
class _CaseSpec:
    where: str
    fields: dict[str, Any]
    assert_where: list[str]  # where each assertion came from, defaultTest's included
    field_where: dict[str, str]


@dataclass
class _CardSpec:
    where: str
    fields: dict[str, Any]  # only what the file sets; an existing card keeps the rest
    cases: list[_CaseSpec]
    field_where: dict[str, str] = field(default_factory=dict)
    existing: PromptCard | None = None  # the target of a CSV
    context: str = ""  # names the prompt when several cards share one list of tests


def _at(where: str, step: str | int) -> str:
    if isinstance(step, int):
        return f"{where}[{step}]"
    return f"{where}.{step}" if where else step


def _kind(value: Any) -> str:
    return KINDS.get(type(value), type(value).__name__)


def _fail(filename: str, where: str, message: str) -> CardFileError:
    return CardFileError([f"{filename}: {where}: {message}" if where else f"{filename}: {message}"])


def _decode(content: str | bytes, filename: str) -> str:
    if len(content) > MAX_BYTES:
        raise _fail(filename, "", f"the file is larger than the limit of {MAX_BYTES >> 20} MB")
    try:
        text = content.decode() if isinstance(content, bytes) else content
    except UnicodeDecodeError as exc:
        raise _fail(filename, "", f"not UTF-8 text (invalid byte at offset {exc.start})") from exc
    if "\x00" in text:
        raise _fail(filename, "", "the file contains NUL characters; it is not a text file")
    return text.removeprefix("\ufeff")  # the byte order mark Excel writes


def _plain(value: Any, where: str, budget: list[int], depth: int = 0) -> Any:
    """A copy of a parsed document that JSONField and PostgreSQL can store, or ValueError."""
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise ValueError(f"{where or 'the document'}: too large or too deeply nested")
    if isinstance(value, dict):
        if (bad := next((k for k in value if not isinstance(k, str)), "")) != "":
            raise ValueError(f"{where or 'the document'}: the key {bad!r} is not text; quote it")
        return {k: _plain(v, _at(where, k), budget, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, _at(where, i), budget, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, datetime.date):  # YAML reads an unquoted 2024-01-01 as a date
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} is not a number that can be stored")
    if isinstance(value, str) and UNSTORABLE_TEXT.search(value):
        raise ValueError(f"{where}: the text has a NUL or an unpaired surrogate character")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"{where}: a {type(value).__name__} value cannot be stored; quote it")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _parse(text: str, suffix: str, filename: str) -> Any:
    """YAML or JSON into plain data; syntax errors come with their line and column."""
    try:
        if suffix == ".json":
            return _plain(json.loads(text, parse_constant=_reject_constant), "", [MAX_NODES])
        return _plain(yaml.safe_load(text), "", [MAX_NODES])
    except json.JSONDecodeError as exc:
        raise _fail(filename, f"line {exc.lineno}, column {exc.colno}", exc.msg) from exc
    except yaml.MarkedYAMLError as exc:
        mark, context = exc.problem_mark, f" ({exc.context})" if exc.context else ""
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise _fail(filename, where, f"{exc.problem}{context}") from exc
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        raise _fail(filename, "", str(exc)) from exc
    except RecursionError as exc:
        raise _fail(filename, "", "the document is nested too deeply") from exc


@dataclass
class _Defaults:
    """promptfoo's defaultTest: its assertions come first in every test; its vars fill gaps."""

    variables: dict[str, Any] = field(default_factory=dict)
    assertions: list[Any] = field(default_factory=list)
    assert_where: list[str] = field(default_factory=list)
    threshold: float | None = None


class _Reader:
    """Turns parsed content into specs, collecting every problem with its place."""

    def __init__(self, filename: str):
        self.filename, self.errors = filename, []

    def add(self, where: str, message: str) -> None:
        self.errors.extend(_fail(self.filename, where, message).errors)

    def stop_if_any(self) -> None:
        if self.errors:
            raise CardFileError(self.errors)

    def get(self, item: dict, key: str, kind: str, where: str, default: Any) -> Any:
        """item[key] if it is of the kind; absent or null gives the default."""
        value = item.get(key)
        if value is None:
            return default
        if kind == "number" and _kind(value) == kind and abs(value) < 1e300:
            return float(value)  # an int too large for a float would overflow
        if (
            kind != "number"
            and _kind(value) == kind
            and (key != "tags" or all(isinstance(tag, str) for tag in value))
        ):
            return value
        kind += " of strings" if key == "tags" else ""
        self.add(_at(where, key), f"must be a {kind}, got a {_kind(value)}")
        return default

    def file_refs(self, value: Any, where: str, what: str = "value") -> None:
        """promptfoo reads `file://...` strings from disk; an upload has no disk to read."""
        if isinstance(value, str) and value.startswith("file://"):
            message = f"file:// references are not supported in an upload; paste the {what} instead"
            self.add(where, message)
        elif isinstance(value, dict | list):
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                self.file_refs(item, _at(where, key), what)

    def test(self, item: Any, where: str, n: int, promptfoo: bool, defaults: _Defaults) -> Any:
        """One test as a _CaseSpec, or None when it is not even a mapping."""
        if not isinstance(item, dict):
            self.add(where, f"a test must be a mapping, got a {_kind(item)}")
            return None
        for key in item.keys() - TEST_KEYS:
            self.add(
                _at(where, key), f"unknown key; expected one of {', '.join(sorted(TEST_KEYS))}"
            )
        variables = self.get(item, "vars", "mapping", where, {})
        assertions = self.get(item, "assert", "list", where, [])
        if promptfoo:
            self.file_refs({"vars": variables, "assert": assertions}, where)
            for name in [name for name, value in variables.items() if isinstance(value, list)]:
                self.add(_at(_at(where, "vars"), name), LIST_VAR_MESSAGE)
            assertions = [_without_metric(spec) for spec in assertions]
        fields = {
            "name": self.get(item, "description", "string", where, f"test {n}"),
            "variables": defaults.variables | variables,
            "assertions": defaults.assertions + assertions,
            "threshold": self.get(item, "threshold", "number", where, defaults.threshold),
        }
        # Our own format says everything about a case; promptfoo has no tags or enabled flag,
        # so a promptfoo file leaves those as they are.
        if not promptfoo or "tags" in item:
            fields["tags"] = self.get(item, "tags", "list", where, [])
        if not promptfoo or "enabled" in item:
            fields["enabled"] = self.get(item, "enabled", "boolean", where, True)
        assert_where = [_at(_at(where, "assert"), i) for i in range(len(assertions))]
        field_where = {name: _at(where, key) for name, key in TEST_FIELD_KEYS.items()}
        return _CaseSpec(where, fields, defaults.assert_where + assert_where, field_where)

    def tests(self, tests: Any, where: str, promptfoo: bool, defaults: _Defaults) -> list:
        if promptfoo and isinstance(tests, str) and tests.startswith("file://"):
            self.file_refs(tests, where, "tests")
        elif not isinstance(tests, list):
            self.add(where, f"must be a list of tests, got a {_kind(tests)}")
        else:
            specs = (
                self.test(t, _at(where, i), i + 1, promptfoo, defaults) for i, t in enumerate(tests)
            )
            return [spec for spec in specs if spec is not None]
        return []

    def prompt(self, prompt: Any, where: str) -> tuple[str, str]:
        """(template, label) from a string or a promptfoo `{raw, label, id}` object."""
        text, label = prompt, ""
        if isinstance(prompt, dict):
            where = _at(where, "raw" if "raw" in prompt else "id")
            text, label = prompt.get("raw", prompt.get("id")), prompt.get("label") or ""
        if isinstance(text, str) and text.startswith("file://"):
            self.file_refs(text, where, "prompt")
        elif not isinstance(text, str) or not isinstance(label, str):
            self.add(where, "a prompt must be text, or a mapping with `raw:` text and `label:`")
        return (text if isinstance(text, str) else ""), str(label)

    def card(self, item: Any, where: str) -> _CardSpec | None:
        """A card in our own format: the file says everything about it, absent fields too."""
        if not isinstance(item, dict):
            self.add(where, f"a card must be a mapping, got a {_kind(item)}")
            return None
        for key in item.keys() - CARD_KEYS:
            self.add(
                _at(where, key), f"unknown key; expected one of {', '.join(sorted(CARD_KEYS))}"
            )
        prompts = item.get("prompts", [])
        prompts = [prompts] if isinstance(prompts, str | dict) else prompts
        if not isinstance(prompts, list) or len(prompts) != 1:
            self.add(_at(where, "prompts"), "a card has exactly one prompt template")
            prompts = [""]
        name = self.get(item, "name", "string", where, "")
        fields = {"name": name, "slug": self.get(item, "slug", "string", where, slugify(name))}
        fields["description"] = self.get(item, "description", "string", where, "")
        fields["tags"] = self.get(item, "tags", "list", where, [])
        fields["system_prompt"] = self.get(item, "system_prompt", "string", where, "")
        fields["template"] = self.prompt(prompts[0], _at(_at(where, "prompts"), 0))[0]
        cases = self.tests(item.get("tests", []), _at(where, "tests"), False, _Defaults())
        field_where = {key: _at(where, key) for key in fields}
        field_where["template"] = _at(_at(where, "prompts"), 0)
        return _CardSpec(where, fields, cases, field_where)

    def defaults(self, default: Any) -> _Defaults:
        if isinstance(default, str):
            self.file_refs(default, "defaultTest", "default test")
        elif default is not None and (
            spec := self.test(default, "defaultTest", 0, True, _Defaults())
        ):
            variables, assertions = spec.fields["variables"], spec.fields["assertions"]
            return _Defaults(variables, assertions, spec.assert_where, spec.fields["threshold"])
        return _Defaults()

    def promptfoo(self, data: dict, stem: str) -> list[_CardSpec]:
        """One card per prompt, each with every test. A card is named after its prompt's label,
        else the config's description, else the file, numbered when there are several."""
        prompts = data.get("prompts")
        prompts = [prompts] if isinstance(prompts, str | dict) else prompts
        if not isinstance(prompts, list) or not prompts:
            self.add("prompts", "must be a list with at least one prompt")
            return []
        description = self.get(data, "description", "string", "", "")
        defaults = self.defaults(data.get("defaultTest"))
        cases = self.tests(data.get("tests", []), "tests", True, defaults)
        read = [self.prompt(prompt, _at("prompts", i)) for i, prompt in enumerate(prompts)]
        base = description or stem
        numbered = [f"{base} {i}" for i in range(1, len(read) + 1)] if len(read) > 1 else [base]
        names = [(label or number)[:200] for (_, label), number in zip(read, numbered, strict=True)]
        specs = []
        for i, ((template, _), name, slug) in enumerate(
            zip(read, names, _unique_slugs(names), strict=True)
        ):
            fields = {"name": name, "slug": slug, "template": template}
            fields |= {"description": description} if description else {}
            where, context = _at("prompts", i), _at("prompts", i) if len(read) > 1 else ""
            specs.append(_CardSpec(where, fields, cases, {"template": where}, context=context))
        return specs

    def document(self, data: Any, stem: str) -> list[_CardSpec]:
        if isinstance(data, dict) and "cards" in data:
            if not isinstance(data["cards"], list):
                self.add("cards", f"must be a list of cards, got a {_kind(data['cards'])}")
                return []
            specs = [self.card(item, _at("cards", i)) for i, item in enumerate(data["cards"])]
            return [spec for spec in specs if spec is not None]
        if isinstance(data, dict) and data.keys() & {"name", "slug", "system_prompt"}:
            return [spec] if (spec := self.card(data, "")) else []
        if isinstance(data, dict) and data.keys() & {"prompts", "tests"}:
            return self.promptfoo(data, stem)
        self.add(
            "",
            f"expected a mapping with `cards:`, a card or a promptfoo config; got a {_kind(data)}",
        )
        return []

    def csv(self, text: str) -> list[_CaseSpec]:
        """promptfoo's CSV: each column is a variable except `__description`, `__expected*`
        (assertions in short form) and `__threshold`. Rows are numbered as a spreadsheet
        numbers them: the header is row 1."""
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = [name.strip() for name in next(reader)]
            rows = [(n, cells) for n, cells in enumerate(reader, start=2) if any(cells)]
        except StopIteration:
            self.add("", "the file is empty; expected a header row")
            return []
        except csv.Error as exc:
            self.add(f"line {reader.line_num}", str(exc))
            return []
        for i, name in enumerate(header):
            if not name or header.index(name) != i:
                self.add("row 1", f"column {i + 1} {f'repeats {name}' if name else 'has no name'}")
            elif name.startswith("__") and not CSV_SPECIAL_COLUMN.fullmatch(name):
                self.add("row 1", f"column {name} is not supported")
        self.stop_if_any()
        return [self.row(header, cells, f"row {n}") for n, cells in rows]

    def row(self, header: list[str], cells: list[str], where: str) -> _CaseSpec:
        if any(cells[len(header) :]):
            self.add(where, f"has {len(cells)} cells but the header has {len(header)} columns")
        row = dict(zip(header, cells + [""] * len(header), strict=False))  # short rows: blanks
        fields = {"name": row.pop("__description", "") or where, "threshold": None}
        if threshold := row.pop("__threshold", "").strip():
            try:
                fields["threshold"] = float(threshold)
            except ValueError:
                self.add(f"{where}, __threshold", f"{threshold!r} is not a number")
        assertions, assert_where = [], []
        for column in [name for name in header if name.startswith("__expected")]:
            if cell := row.pop(column).strip():
                try:
                    assertions.append(assertion_from_short_form(cell))
                    assert_where.append(f"{where}, {column}")
                except ValueError as exc:
                    self.add(f"{where}, {column}", str(exc))
        self.file_refs(row, where)
        fields |= {"variables": row, "assertions": assertions}
        field_where = {"name": f"{where}, __description", "threshold": f"{where}, __threshold"}
        return _CaseSpec(where, fields, assert_where, field_where)


def _without_metric(spec: Any) -> Any:
    # promptfoo's `metric` only names a score in its reports; nothing here would read it.
    return {k: v for k, v in spec.items() if k != "metric"} if isinstance(spec, dict) else spec


def _unique_slugs(names: list[str]) -> list[str]:
    slugs: list[str] = []
    for name in names:
        base = slugify(name)[:190] or "card"
        slug, n = base, 2
        while slug in slugs:
            slug, n = f"{base}-{n}", n + 1
        slugs.append(slug)
    return slugs


def assertion_from_short_form(text: str) -> dict[str, Any]:
    """promptfoo's CSV shorthand (`contains: foo`, `is-json`, `not-regex: ^a`, `grade: ...`);
    text with no known type in front means `equals`. ValueError for what we cannot honour."""
    text = "llm-rubric:" + text.removeprefix("grade:") if text.startswith("grade:") else text
    match = SHORT_FORM.fullmatch(text)
    name = match[2] if match else None
    if name in CODE_TYPES or text.startswith("file://"):
        raise ValueError(f"{name or 'file://'} assertions run code and are not supported here")
    if name not in SHORT_FORM_TYPES:
        return {"type": "equals", "value": text}
    if match[3]:
        raise ValueError(f"a threshold in {name}{match[3]} is not supported")
    spec: dict[str, Any] = {"type": (match[1] or "") + name}
    value = match[4]
    if name in LIST_VALUED and value is not None:
        spec["value"] = [item.strip() for item in value.split(",")]
    elif name in JSON_VALUED and value:  # e.g. `latency: 500`, an `is-json` schema
        try:
            spec["value"] = json.loads(value)
        except ValueError:
            spec["value"] = value
    elif value is not None and (value or name not in JSON_VALUED):
        spec["value"] = value
    return spec


# -- Import ----------------------------------------------------------------------------------


@dataclass
class _Plan:
    card: PromptCard
    save_card: bool
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


def _validate(obj: PromptCard | TestCase, spec: Any, reader: _Reader, context: str = "") -> bool:
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


def _locate(spec: _CardSpec | _CaseSpec, name: str, message: str, context: str) -> tuple[str, str]:
    if name == "assertions" and (match := re.match(r"assertion (\d+)\b", message)):
        if int(match[1]) <= len(spec.assert_where):
            return spec.assert_where[int(match[1]) - 1], message
    if name == "variables" and context:  # a shared test can miss different variables per card
        message = f"{message} (with {context})"
    return spec.field_where.get(name, spec.where), message


def _plan_card(spec: _CardSpec, user: Any, reader: _Reader) -> _Plan:
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


def _save(plans: list[_Plan], user: Any, note: str) -> ImportReport:
    report = ImportReport()
    for plan in plans:
        if plan.save_card:
            plan.card.save()
            latest = plan.card.versions.aggregate(n=Max("number"))["n"]
            version = snapshot_version(plan.card, author=user, note=note)
            report.versions_created += version.number != latest
        report.cards_created += plan.created
        report.cards_updated += plan.save_card and not plan.created
        report.cards_unchanged += not plan.save_card
        TestCase.objects.bulk_create(plan.new_cases, batch_size=500)
        TestCase.objects.bulk_update(plan.changed_cases, CASE_FIELDS, batch_size=500)
        report.cases_created += len(plan.new_cases)
        report.cases_updated += len(plan.changed_cases)
        report.cases_unchanged += plan.unchanged_cases
    return report


def _check_limits(specs: list[_CardSpec], reader: _Reader) -> None:
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


def import_cards(
    content: str | bytes, *, filename: str, user: Any = None, card: PromptCard | None = None
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
    reader, suffix = _Reader(filename), Path(filename).suffix.lower()
    text = _decode(content, filename)
    if suffix == ".csv":
        if card is None:
            raise _fail(filename, "", "a CSV file holds test cases only; choose their card")
        specs = [_CardSpec("", {}, reader.csv(text), existing=card)]
    elif suffix in (".yaml", ".yml", ".json"):
        if card is not None:
            raise _fail(filename, "", "this file defines its own cards; import it without a card")
        specs = reader.document(_parse(text, suffix, filename), Path(filename).stem)
    else:
        raise _fail(filename, "", "unknown file type; expected .yaml, .yml, .json or .csv")
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
        raise _fail(filename, "", f"could not be saved ({str(exc).splitlines()[0]})") from exc
