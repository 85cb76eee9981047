"""Our own format, read and written: promptfoo's tests inside cards that say everything a card
has (name, slug, description, tags, system prompt, one prompt template)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any

import yaml
from django.utils.text import slugify

from testruns.catalog.card_files.reading import CardSpec, CaseSpec, Reader, at, kind_of
from testruns.models import PromptCard, TestCase

CARD_KEYS = {"name", "slug", "description", "tags", "system_prompt", "prompts", "tests"}
TEST_KEYS = {"description", "vars", "assert", "threshold", "tags", "enabled"}
TEST_FIELD_KEYS = {"name": "description", "variables": "vars", "threshold": "threshold"}
TEST_FIELD_KEYS |= {"tags": "tags", "enabled": "enabled"}


# -- Export ----------------------------------------------------------------------------------


class BlockDumper(yaml.SafeDumper):
    """Block style, with list items indented under their key as promptfoo's docs write them."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line text as a `|` block; PyYAML quotes it instead when a block cannot hold it
    # exactly (trailing spaces, control characters).
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


BlockDumper.add_representer(str, _represent_str)


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
        return yaml.dump(doc, Dumper=BlockDumper, **options)
    raise ValueError(f"Unknown format {fmt!r}; expected yaml or json.")


# -- Import ----------------------------------------------------------------------------------


def read_card(reader: Reader, item: Any, where: str) -> CardSpec | None:
    """A card in our own format: the file says everything about it, absent fields too."""
    if not isinstance(item, dict):
        reader.add(where, f"a card must be a mapping, got a {kind_of(item)}")
        return None
    for key in item.keys() - CARD_KEYS:
        reader.add(at(where, key), f"unknown key; expected one of {', '.join(sorted(CARD_KEYS))}")
    prompts = item.get("prompts", [])
    prompts = [prompts] if isinstance(prompts, str | dict) else prompts
    if not isinstance(prompts, list) or len(prompts) != 1:
        reader.add(at(where, "prompts"), "a card has exactly one prompt template")
        prompts = [""]
    name = reader.get(item, "name", "string", where, "")
    fields = {"name": name, "slug": reader.get(item, "slug", "string", where, slugify(name))}
    fields["description"] = reader.get(item, "description", "string", where, "")
    fields["tags"] = reader.get(item, "tags", "list", where, [])
    fields["system_prompt"] = reader.get(item, "system_prompt", "string", where, "")
    fields["template"] = _read_prompt(reader, prompts[0], at(at(where, "prompts"), 0))
    cases = _read_tests(reader, item.get("tests", []), at(where, "tests"))
    field_where = {key: at(where, key) for key in fields}
    field_where["template"] = at(at(where, "prompts"), 0)
    return CardSpec(where, fields, cases, field_where)


def _read_prompt(reader: Reader, prompt: Any, where: str) -> str:
    """The template, from a string or a promptfoo `{raw, label}` object."""
    text = prompt.get("raw") if isinstance(prompt, dict) else prompt
    if not isinstance(text, str):
        reader.add(where, "a prompt must be text, or a mapping with `raw:` text")
        return ""
    return text


def _read_tests(reader: Reader, tests: Any, where: str) -> list[CaseSpec]:
    if not isinstance(tests, list):
        reader.add(where, f"must be a list of tests, got a {kind_of(tests)}")
        return []
    specs = (_read_test(reader, t, at(where, i), i + 1) for i, t in enumerate(tests))
    return [spec for spec in specs if spec is not None]


def _read_test(reader: Reader, item: Any, where: str, n: int) -> CaseSpec | None:
    """One case in our format: the file says everything about it."""
    if not isinstance(item, dict):
        reader.add(where, f"a test must be a mapping, got a {kind_of(item)}")
        return None
    for key in item.keys() - TEST_KEYS:
        reader.add(at(where, key), f"unknown key; expected one of {', '.join(sorted(TEST_KEYS))}")
    assertions = reader.get(item, "assert", "list", where, [])
    fields = {
        "name": reader.get(item, "description", "string", where, f"test {n}"),
        "variables": reader.get(item, "vars", "mapping", where, {}),
        "assertions": assertions,
        "threshold": reader.get(item, "threshold", "number", where, None),
        "tags": reader.get(item, "tags", "list", where, []),
        "enabled": reader.get(item, "enabled", "boolean", where, True),
    }
    assert_where = [at(at(where, "assert"), i) for i in range(len(assertions))]
    field_where = {name: at(where, key) for name, key in TEST_FIELD_KEYS.items()}
    return CaseSpec(where, fields, assert_where, field_where)
