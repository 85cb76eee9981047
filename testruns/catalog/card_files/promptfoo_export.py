"""Cards as a promptfoo project that promptfoo itself runs: `promptfooconfig.yaml` with one
prompt per card (labelled with its name; a card with a system prompt as a JSON chat file under
prompts/), `providers` (OpenAI-compatible ones as `openai:chat:<model>` with `apiBaseUrl`,
Anthropic as `anthropic:messages:<model>`), `tests` (each card's cases, once when cards share
them, else narrowed to their card's prompt) and `defaultTest` (the assertions every test
starts with, and the card's grader). Our spellings become promptfoo's (levenshtein's and
latency's threshold, json-schema as is-json, json-path and Python-only regex flags as
javascript), and a case's transform every assertion shares becomes its `options.transform`.
What promptfoo cannot be given is returned as notes."""

from __future__ import annotations

import io
import json
import re
import sys
import zipfile
from typing import Any

import yaml

from testruns.catalog.assertions.javascript import transform_body
from testruns.catalog.assertions.structured import parse_path
from testruns.catalog.card_files.ours import BlockDumper
from testruns.models import PromptCard, Provider, TestCase, TestRun

CONFIG = "promptfooconfig.yaml"
SCHEMA_COMMENT = "# yaml-language-server: $schema=https://promptfoo.dev/config-schema.json\n"
_INLINE_FLAGS = re.compile(r"^\(\?([aiLmsux]+)\)")


def export_promptfoo(
    cards: list[PromptCard], providers: list[Provider]
) -> tuple[dict[str, str], list[str]]:
    """(files by path, notes): the project promptfoo runs, and what it could not hold."""
    notes: list[str] = []
    description, labels = _labels(cards)
    files: dict[str, str] = {}
    prompts = []
    for card, label in zip(cards, labels, strict=True):
        if card.system_prompt:
            path = f"prompts/{card.slug}.json"
            chat = [
                {"role": "system", "content": card.system_prompt},
                {"role": "user", "content": card.template},
            ]
            files[path] = json.dumps(chat, indent=2, ensure_ascii=False) + "\n"
            prompts.append({"id": f"file://{path}", "label": label})
        else:
            prompts.append({"raw": card.template, "label": label})
    tests = _tests(cards, labels, notes)
    config: dict[str, Any] = {"description": description, "prompts": prompts}
    config["providers"] = [spec for p in providers if (spec := _provider(p, notes))]
    default = _default_test(tests)
    grader = next((card.grader_provider for card in cards if card.grader_provider_id), None)
    if grader is not None and (spec := _provider(grader, notes)):
        default.setdefault("options", {})["provider"] = spec
    if default:
        config["defaultTest"] = default
    config["tests"] = tests
    options = {"sort_keys": False, "allow_unicode": True, "width": sys.maxsize}
    files[CONFIG] = SCHEMA_COMMENT + yaml.dump(config, Dumper=BlockDumper, **options)
    return files, notes


def default_providers(cards: list[PromptCard]) -> list[Provider]:
    """The providers of the cards' latest runs, newest first: what an export names when it is
    not told which."""
    runs = TestRun.objects.filter(card__in=cards).order_by("-queued_at").select_related("provider")
    found: dict[int, Provider] = {}
    for run in runs[:50]:
        found.setdefault(run.provider_id, run.provider)
    return list(found.values())


def export_promptfoo_zip(cards: list[PromptCard], providers: list[Provider]) -> bytes:
    files, notes = export_promptfoo(cards, providers)
    if notes:
        files["NOT-EXPORTED.txt"] = "\n".join(notes) + "\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, text in sorted(files.items()):
            archive.writestr(path, text)
    return buffer.getvalue()


def _labels(cards: list[PromptCard]) -> tuple[str, list[str]]:
    """The config's description and each prompt's label: cards an import named
    "<description>: <label>" get those back, so that importing the export matches them."""
    if len(cards) == 1:
        return cards[0].name, [cards[0].name]
    prefixes = {card.name.split(": ", 1)[0] for card in cards if ": " in card.name}
    if len(prefixes) == 1 and all(": " in card.name for card in cards):
        prefix = prefixes.pop()
        return prefix, [card.name.split(": ", 1)[1] for card in cards]
    return "Prompt cards", [card.name for card in cards]


def _provider(provider: Provider, notes: list[str]) -> dict[str, Any] | None:
    config: dict[str, Any] = {}
    if provider.kind == Provider.Kind.OPENAI:
        spec = {"id": f"openai:chat:{provider.model}"}
    elif provider.kind == Provider.Kind.ANTHROPIC:
        spec = {"id": f"anthropic:messages:{provider.model}"}
    else:
        notes.append(
            f"provider {provider.name}: a {provider.get_kind_display()} has no promptfoo id"
        )
        return None
    if provider.base_url:
        config["apiBaseUrl"] = provider.base_url
    if provider.api_key_env:
        config["apiKeyEnvar"] = provider.api_key_env
    params = provider.parameters if isinstance(provider.parameters, dict) else {}
    config |= {
        k: v for k, v in params.items() if k in ("temperature", "max_tokens", "top_p", "seed")
    }
    spec["label"] = provider.name
    if config:
        spec["config"] = config
    return spec


def _tests(cards: list[PromptCard], labels: list[str], notes: list[str]) -> list[dict[str, Any]]:
    """Each distinct test once, narrowed to the prompts of the cards that have it unless
    every card has it."""
    found: list[tuple[dict[str, Any], list[str]]] = []
    for card, label in zip(cards, labels, strict=True):
        for case in card.cases.all():
            if not case.enabled:
                notes.append(f"card {card.slug}: case {case.name!r} is disabled and not exported")
                continue
            test = _test(case, notes, card.slug)
            same = next((entry for entry in found if entry[0] == test), None)
            if same:
                same[1].append(label)
            else:
                found.append((test, [label]))
    tests = []
    for test, used_by in found:
        if len(used_by) < len(cards):
            test = {"description": test["description"], "prompts": used_by, **test}
        tests.append(test)
    return tests


def _test(case: TestCase, notes: list[str], slug: str) -> dict[str, Any]:
    test: dict[str, Any] = {"description": case.name, "vars": dict(case.variables)}
    for name, value in case.variables.items():
        if isinstance(value, list):
            notes.append(
                f"card {slug}: case {case.name!r}: promptfoo runs a test once per item of the "
                f"list in var {name}"
            )
    assertions = [_assertion(spec) for spec in case.assertions]
    # A transform every assertion starts with is the test's options.transform (as an import
    # of promptfoo's stored it); what follows it stays on the assertion.
    heads = [t[0] if isinstance(t := a.get("transform"), list) and t else None for a in assertions]
    if heads and heads[0] is not None and all(head == heads[0] for head in heads):
        test["options"] = {"transform": heads[0]}
        for a in assertions:
            rest = a.pop("transform")[1:]
            if rest:
                a["transform"] = rest
    for a in assertions:
        if isinstance(a.get("transform"), list):
            a["transform"] = _chain(a["transform"])
    test["assert"] = assertions
    if case.threshold is not None:
        test["threshold"] = case.threshold
    metadata = _metadata(case.tags)
    if metadata:
        test["metadata"] = metadata
    return test


def _chain(steps: list[str]) -> str:
    """Several transforms as one: each step's result is the next one's output."""
    if len(steps) == 1:
        return steps[0]
    body = ["let value = output;"]
    for step in steps:
        inner = transform_body(step).replace("\n", "\n  ")
        body.append(f"value = (function (output, context) {{\n  {inner}\n}})(value, context);")
    return "\n".join([*body, "return value;"])


def _assertion(spec: dict[str, Any]) -> dict[str, Any]:
    out = dict(spec)
    kind, value = spec.get("type", ""), spec.get("value")
    base = kind.removeprefix("not-")
    if base == "levenshtein" and isinstance(value, dict):
        out |= {"value": value.get("expected"), "threshold": value.get("max")}
    elif base in ("latency", "cost"):
        out.pop("value", None)
        out["threshold"] = value
    elif kind == "json-schema":
        out["type"] = "is-json"
    elif kind == "json-path" and isinstance(value, dict):
        out["type"] = "javascript"
        out["value"] = _json_path_js(value["path"], value["equals"])
    elif base == "regex" and isinstance(value, str) and (match := _INLINE_FLAGS.match(value)):
        flags = "".join(f for f in match[1] if f in "ims")
        test = f"new RegExp({json.dumps(value[match.end() :])}, {json.dumps(flags)}).test(output)"
        out = {**out, "type": "javascript", "value": test if base == kind else f"!{test}"}
    return {
        key: out[key]
        for key in ("type", "value", "threshold", "weight", "metric", "transform")
        if key in out and out[key] is not None
    }


def _json_path_js(path: str, expected: Any) -> str:
    """json-path as javascript: the value at the path equals the expected JSON (key order
    aside, 1 equal to 1.0)."""
    steps = json.dumps(parse_path(path))
    return (
        "const same = (a, b) => JSON.stringify(sort(a)) === JSON.stringify(sort(b));\n"
        "function sort(v) {\n"
        "  if (Array.isArray(v)) return v.map(sort);\n"
        "  if (v && typeof v === 'object') return Object.fromEntries(Object.keys(v).sort()"
        ".map((k) => [k, sort(v[k])]));\n"
        "  return v;\n"
        "}\n"
        "let node = typeof output === 'string' ? JSON.parse(output) : output;\n"
        f"for (const step of {steps}) {{\n"
        "  const index = typeof step === 'number' || /^\\d+$/.test(step) ? Number(step) : null;\n"
        "  if (Array.isArray(node) && index !== null) node = node.at(index);\n"
        "  else if (node && typeof node === 'object' && step in node) node = node[step];\n"
        "  else return false;\n"
        "}\n"
        f"return same(node, {json.dumps(expected)});"
    )


def _metadata(tags: list[str]) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for tag in tags:
        key, sep, value = tag.partition(":")
        if not sep:
            metadata.setdefault("tags", []).append(tag)
        elif key in metadata:
            metadata[key] = [
                *(metadata[key] if isinstance(metadata[key], list) else [metadata[key]]),
                value,
            ]
        else:
            metadata[key] = value
    return metadata


def _default_test(tests: list[dict[str, Any]]) -> dict[str, Any]:
    """The assertions every test starts with move to defaultTest (promptfoo puts them first
    again), so that a config imported from promptfoo comes back with its defaultTest."""
    if len(tests) < 2:
        return {}
    common = 0
    first = tests[0]["assert"]
    while common < len(first) and all(
        len(t["assert"]) > common and t["assert"][common] == first[common] for t in tests
    ):
        common += 1
    if not common:
        return {}
    for test in tests:
        test["assert"] = test["assert"][common:]
    return {"assert": first[:common]}
