"""A promptfoo assertion as this app stores it: `$ref` templates resolved, the value rendered
with the test's vars (at import: a stored value is what promptfoo would have compared with),
promptfoo's spellings turned into ours (levenshtein's and latency's threshold, word-count's
number, comma-separated lists, schemas written as YAML text), and what has no equivalent here
listed as not imported, with why."""

from __future__ import annotations

import csv
import io
from typing import Any

from jinja2 import TemplateError

from testruns.catalog.assertions import ASSERTION_TYPES, REFUSED_TYPES
from testruns.catalog.card_files.parsing import load_yaml
from testruns.catalog.card_files.reading import Reader, at, kind_of
from testruns.catalog.prompts import render_leniently

KEYS = {"type", "value", "weight", "threshold", "metric", "transform"}
KEY_REASONS = {
    "provider": "a grader per assertion; the card's grader provider grades every assertion",
    "rubricPrompt": "a grader prompt of its own; the built-in grading prompts are used",
    "config": "configuration for custom code, which this app does not run",
    "contextTransform": "context for RAG assertions, which this app does not have",
}
LIST_TYPES = {"contains-any", "contains-all", "icontains-any", "icontains-all"}
SCHEMA_TYPES = {"is-json", "contains-json"}


def convert_assertion(
    reader: Reader,
    spec: Any,
    where: str,
    variables: dict[str, Any],
    templates: dict[str, Any],
    tools: list[Any] | None = None,
) -> dict[str, Any] | None:
    """Our spec for a promptfoo assertion, or None when it is not taken (it is then listed as
    skipped, or as an error when it is malformed)."""
    if isinstance(spec, dict) and "$ref" in spec:
        spec = _resolved(reader, spec, where, templates)
    if not isinstance(spec, dict):
        if spec is not None:
            reader.add(where, f"an assertion must be a mapping, got a {kind_of(spec)}")
        return None
    kind = spec.get("type")
    if not isinstance(kind, str):
        reader.add(at(where, "type"), "an assertion needs a type")
        return None
    base = kind.removeprefix("not-")
    if base in REFUSED_TYPES:
        reader.skip(where, f"{kind}: {REFUSED_TYPES[base]}")
        return None
    if kind == "assert-set":
        reader.skip(where, "assert-set (a group with its own threshold) has no equivalent here")
        return None
    if kind not in ASSERTION_TYPES:
        reader.skip(where, f"{kind} is not an assertion type this app has")
        return None
    if spec.get("weight") == 0:
        reader.skip(where, f"{kind} has weight 0: promptfoo counts it for nothing")
        return None
    for key in spec.keys() - KEYS - {"$ref"}:
        reader.skip(at(where, key), KEY_REASONS.get(key, "not an assertion key this app has"))
    ours = {key: spec[key] for key in KEYS if key in spec}
    value = ours.get("value")
    if isinstance(value, str) and value.startswith("file://"):
        reader.skip(at(where, "value"), "a value from a file (or code in a file) is not imported")
        return None
    try:
        ours.update(_rendered(ours, variables))
    except TemplateError as exc:
        reader.add(at(where, "value"), f"the value cannot be rendered with the vars: {exc}")
        return None
    return _our_spelling(reader, ours, where, tools)


def _resolved(reader: Reader, spec: dict[str, Any], where: str, templates: dict[str, Any]) -> Any:
    ref = spec["$ref"]
    name = ref.removeprefix("#/assertionTemplates/") if isinstance(ref, str) else None
    if not isinstance(ref, str) or name == ref or not isinstance(templates.get(name), dict):
        reader.add(at(where, "$ref"), f"{ref!r} names no entry of assertionTemplates")
        return None
    return {**templates[name], **{k: v for k, v in spec.items() if k != "$ref"}}


def _rendered(spec: dict[str, Any], variables: dict[str, Any]) -> dict[str, Any]:
    value = spec.get("value")
    if isinstance(value, str):
        return {"value": render_leniently(value, variables)}
    if isinstance(value, list):
        return {
            "value": [
                render_leniently(item, variables) if isinstance(item, str) else item
                for item in value
            ]
        }
    return {}


def _our_spelling(
    reader: Reader, spec: dict[str, Any], where: str, tools: list[Any] | None
) -> dict[str, Any] | None:
    base = spec["type"].removeprefix("not-")
    value, threshold = spec.get("value"), spec.get("threshold")
    if base == "levenshtein" and isinstance(value, str):
        spec["value"] = {"expected": value, "max": int(5 if threshold is None else threshold)}
        spec.pop("threshold", None)
    elif base in ("latency", "cost") and "value" not in spec and threshold is not None:
        spec["value"] = threshold
        spec.pop("threshold")
    elif base == "word-count" and isinstance(value, int) and not isinstance(value, bool):
        spec["value"] = {"min": value, "max": value}
    elif base in LIST_TYPES and isinstance(value, str):
        spec["value"] = comma_separated(value)
    elif base in SCHEMA_TYPES and isinstance(value, str):
        try:
            spec["value"] = load_yaml(value)
        except Exception as exc:  # any YAML error: the schema text does not parse
            reader.add(at(where, "value"), f"the schema does not parse as YAML or JSON: {exc}")
            return None
    elif base == "is-valid-openai-tools-call" and "value" not in spec:
        if not tools:
            reader.skip(where, f"{base} needs the tools: none is in the value or the providers")
            return None
        spec["value"] = tools
    return spec


def comma_separated(text: str) -> list[str]:
    """promptfoo's comma-separated list: quoted items may hold commas."""
    row = next(csv.reader(io.StringIO(text), skipinitialspace=True), [])
    return [item.strip() for item in row if item.strip()]
