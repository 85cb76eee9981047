"""promptfoo's config as promptfoo reads it: one card per prompt, each with the tests that apply
to it (a test's `prompts:` can narrow that), defaultTest merged into every test wherever the
tests come from, a test whose vars hold lists run once per combination, `options.transform`
kept on every assertion, metadata kept as `key:value` tags; providers read for the report.
What has no equivalent here is listed (Reader.skip), never dropped silently.

Cards are named from the config's description, else the name the caller gives (the config's
folder), and, when the config has several prompts, each prompt's label or number after it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from django.utils.text import slugify

from testruns.catalog.card_files.csv_cases import csv_tests
from testruns.catalog.card_files.promptfoo_asserts import convert_assertion
from testruns.catalog.card_files.promptfoo_providers import (
    ProviderRef,
    read_provider,
    read_providers,
    tools_of,
)
from testruns.catalog.card_files.promptfoo_refs import (
    Source,
    TestItem,
    read_default,
    read_prompts,
    read_test_items,
    read_vars,
)
from testruns.catalog.card_files.reading import CardSpec, CaseSpec, Defaults, Reader, at, kind_of

CONFIG_KEYS = {"description", "prompts", "providers", "tests", "defaultTest", "assertionTemplates"}
CONFIG_REASONS = {
    "scenarios": "scenarios (groups of vars crossed with tests) are not imported",
    "evaluateOptions": "run settings are chosen when a run is launched here",
    "redteam": "red-team generation has no equivalent here",
    "extensions": "extensions are code, which this app does not run",
    "nunjucksFilters": "custom Nunjucks filters are code, which this app does not run",
    "derivedMetrics": "derived metrics have no equivalent here",
    "outputPath": "results are kept in this app's reports",
    "sharing": "results are kept in this app's reports",
    "env": "environment values are not taken from a config",
}
TEST_KEYS = {"description", "vars", "assert", "threshold", "metadata", "options", "prompts"}
TEST_KEYS |= {"tags", "enabled"}  # this app's own, written by nobody else
OPTION_KEYS = {"transform", "disableDefaultAsserts"}
DEFAULT_OPTION_KEYS = OPTION_KEYS | {"provider"}
MAX_TAG = 50
MAX_COMBINATIONS = 1000


@dataclass
class ConfigRead:
    """A config's cards, the providers it names, and the grader its defaultTest names."""

    cards: list[CardSpec]
    providers: list[ProviderRef] = field(default_factory=list)
    grader: ProviderRef | None = None


def read_config(reader: Reader, data: dict, name: str, source: Source | None = None) -> ConfigRead:
    source = source or Source(reader, None, "")
    for key in data.keys() - CONFIG_KEYS:
        reader.skip(key, CONFIG_REASONS.get(key, "not a config key this app reads"))
    templates = data.get("assertionTemplates") or {}
    templates = templates if isinstance(templates, dict) else {}
    description = reader.get(data, "description", "string", "", "")
    prompts = read_prompts(source, data.get("prompts"))
    defaults, grader = _read_defaults(source, read_default(source, data.get("defaultTest")))
    tools = tools_of(data.get("providers"))
    items = read_test_items(source, data.get("tests"))
    # promptfoo runs a config without tests once, with defaultTest alone.
    items = items or [TestItem({}, "defaultTest" if defaults.assertions else "tests", reader)]
    cases = [
        case
        for n, item in enumerate(items, 1)
        for case in read_test(source, item, n, defaults, templates, tools)
    ]
    return ConfigRead(
        _cards(prompts, cases, description, name),
        read_providers(reader, data.get("providers")),
        grader,
    )


def _cards(prompts: list, cases: list[CaseSpec], description: str, name: str) -> list[CardSpec]:
    base = (description or name or "promptfoo").strip()[:200]
    names = [
        base if len(prompts) == 1 else f"{base}: {prompt.label or n}"[:200]
        for n, prompt in enumerate(prompts, 1)
    ]
    specs = []
    for prompt, card_name, slug in zip(prompts, names, unique_slugs(names), strict=True):
        fields = {"name": card_name, "slug": slug, "template": prompt.template}
        fields["system_prompt"] = prompt.system
        fields |= {"description": description} if description else {}
        mine = [
            c for c in cases if c.prompts is None or (prompt.label and prompt.label in c.prompts)
        ]
        context = prompt.where if len(prompts) > 1 else ""
        field_where = {"template": prompt.where, "system_prompt": prompt.where}
        specs.append(CardSpec(prompt.where, fields, mine, field_where, context=context))
    return specs


def _read_defaults(source: Source, default: dict[str, Any]) -> tuple[Defaults, ProviderRef | None]:
    reader = source.reader
    for key in default.keys() - TEST_KEYS:
        reader.skip(at("defaultTest", key), "not a test key this app reads")
    options = _options(reader, default.get("options"), "defaultTest", DEFAULT_OPTION_KEYS)
    grader = None
    if "provider" in options:
        grader = read_provider(reader, options.pop("provider"), "defaultTest.options.provider")
    assertions = reader.get(default, "assert", "list", "defaultTest", [])
    metadata = reader.get(default, "metadata", "mapping", "defaultTest", {})
    return Defaults(
        variables=read_vars(source, reader, default.get("vars"), "defaultTest.vars"),
        assertions=assertions,
        assert_where=[at("defaultTest.assert", i) for i in range(len(assertions))],
        threshold=reader.get(default, "threshold", "number", "defaultTest", None),
        options=options,
        metadata=metadata,
    ), grader


def _options(reader: Reader, options: Any, where: str, keys: set[str]) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        reader.add(at(where, "options"), f"must be a mapping, got a {kind_of(options)}")
        return {}
    for key in options.keys() - keys:
        reader.skip(at(at(where, "options"), key), "not an option this app has")
    return {key: value for key, value in options.items() if key in keys}


def read_test(
    source: Source,
    item: TestItem,
    n: int,
    defaults: Defaults,
    templates: dict[str, Any] | None = None,
    tools: list[Any] | None = None,
) -> list[CaseSpec]:
    """A promptfoo test as cases: one, or one per combination of its list-valued vars."""
    reader, where, test = item.reader, item.where, item.data
    if not isinstance(test, dict):
        reader.add(where, f"a test must be a mapping, got a {kind_of(test)}")
        return []
    for key in test.keys() - TEST_KEYS:
        reader.skip(at(where, key), "not a test key this app reads")
    options = defaults.options | _options(reader, test.get("options"), where, OPTION_KEYS)
    own = reader.get(test, "assert", "list", where, [])
    own_where = item.assert_where or [at(at(where, "assert"), i) for i in range(len(own))]
    raw, raw_where = own, own_where
    if not options.get("disableDefaultAsserts"):
        raw, raw_where = defaults.assertions + own, defaults.assert_where + own_where
    variables = defaults.variables | read_vars(source, reader, test.get("vars"), at(where, "vars"))
    transform = options.get("transform")
    if transform is not None and not isinstance(transform, str):
        reader.add(at(where, "options.transform"), "must be JavaScript code (a string)")
        transform = None
    name = reader.get(test, "description", "string", where, "") or f"test {n}"
    base_fields = {"threshold": reader.get(test, "threshold", "number", where, defaults.threshold)}
    # promptfoo has no tags: its metadata becomes them. Without any, a case keeps its own.
    if defaults.metadata or "metadata" in test or "tags" in test:
        metadata = defaults.metadata | reader.get(test, "metadata", "mapping", where, {})
        base_fields["tags"] = _tags(reader, metadata, where) + reader.get(
            test, "tags", "list", where, []
        )
    if "enabled" in test:
        base_fields["enabled"] = reader.get(test, "enabled", "boolean", where, True)
    prompts = test.get("prompts")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    field_where = {"name": at(where, "description"), "variables": at(where, "vars")}
    field_where |= {"threshold": at(where, "threshold"), "tags": at(where, "metadata")}
    if item.assert_where is not None:  # a CSV row: its columns are its places
        field_where = {"name": f"{where}, __description", "threshold": f"{where}, __threshold"}
        field_where |= {"variables": where, "tags": where}
    cases = []
    for combination, label in _combinations(reader, variables, where):
        assertions, assert_where = [], []
        for spec, spec_where in zip(raw, raw_where, strict=False):
            converted = convert_assertion(
                reader, spec, spec_where, combination, templates or {}, tools
            )
            if converted is None:
                continue
            if transform:
                own_transform = converted.get("transform")
                own_steps = own_transform if isinstance(own_transform, list) else [own_transform]
                converted["transform"] = [transform, *(s for s in own_steps if s is not None)]
            assertions.append(converted)
            assert_where.append(spec_where)
        fields = base_fields | {
            "name": f"{name} {label}"[:200] if label else name,
            "variables": combination,
            "assertions": assertions,
        }
        cases.append(CaseSpec(where, fields, assert_where, field_where, prompts))
    return cases


def _combinations(reader: Reader, variables: dict[str, Any], where: str) -> list[tuple[dict, str]]:
    """promptfoo runs a test once per combination of the items of its list-valued vars."""
    lists = {name: value for name, value in variables.items() if isinstance(value, list) and value}
    if not lists:
        return [(variables, "")]
    count = 1
    for value in lists.values():
        count *= len(value)
    if count > MAX_COMBINATIONS:
        reader.add(
            at(where, "vars"), f"{count} combinations of list vars is over {MAX_COMBINATIONS}"
        )
        return []
    found = []
    for values in itertools.product(*lists.values()):
        chosen = dict(zip(lists, values, strict=True))
        label = ", ".join(f"{k}={v}" for k, v in chosen.items())
        found.append((variables | chosen, f"[{label}]"))
    return found


def _tags(reader: Reader, metadata: dict[str, Any], where: str) -> list[str]:
    """metadata as tags: `key:value`, one per item of a list; `tags: [...]` as they are."""
    tags = []
    for key, value in metadata.items():
        for item in value if isinstance(value, list) else [value]:
            tag = (
                str(item)
                if key == "tags"
                else f"{key}:{item if isinstance(item, str) else _plain(item)}"
            )
            if len(tag) > MAX_TAG or isinstance(item, dict | list):
                reader.skip(
                    at(at(where, "metadata"), key),
                    f"a tag holds at most {MAX_TAG} characters of text",
                )
            elif tag not in tags:
                tags.append(tag)
    return tags


def _plain(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def unique_slugs(names: list[str]) -> list[str]:
    slugs: list[str] = []
    for name in names:
        base = slugify(name)[:190] or "card"
        slug, n = base, 2
        while slug in slugs:
            slug, n = f"{base}-{n}", n + 1
        slugs.append(slug)
    return slugs


def read_csv(reader: Reader, text: str) -> list[CaseSpec]:
    """promptfoo's CSV of test cases for a chosen card: each row a test, as promptfoo reads it."""
    source = Source(reader, None, "")
    return [
        case
        for n, (test, where, assert_where) in enumerate(csv_tests(reader, text), 1)
        for case in read_test(source, TestItem(test, where, reader, assert_where), n, Defaults())
    ]
