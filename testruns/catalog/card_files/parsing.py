"""From a file's bytes to plain data: its size and encoding, YAML or JSON syntax, and only
values that JSONField and PostgreSQL can store."""

from __future__ import annotations

import datetime
import json
import math
import re
from typing import Any

import yaml

from testruns.catalog.card_files.errors import fail
from testruns.catalog.card_files.reading import at

MAX_BYTES = 5 * 1024 * 1024
# YAML aliases let a small file expand into a huge document ("billion laughs"); counting nodes
# while copying it stops that long before memory runs out.
MAX_NODES = 1_000_000
MAX_DEPTH = 100
# PostgreSQL stores neither; JSON's \u0000 and lone \ud800 escapes can produce them.
UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")


def decode(content: str | bytes, filename: str) -> str:
    if len(content) > MAX_BYTES:
        raise fail(filename, "", f"the file is larger than the limit of {MAX_BYTES >> 20} MB")
    try:
        text = content.decode() if isinstance(content, bytes) else content
    except UnicodeDecodeError as exc:
        raise fail(filename, "", f"not UTF-8 text (invalid byte at offset {exc.start})") from exc
    if "\x00" in text:
        raise fail(filename, "", "the file contains NUL characters; it is not a text file")
    return text.removeprefix("\ufeff")  # the byte order mark Excel writes


def _plain(value: Any, where: str, budget: list[int], depth: int = 0) -> Any:
    """A copy of a parsed document that JSONField and PostgreSQL can store, or ValueError."""
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise ValueError(f"{where or 'the document'}: too large or too deeply nested")
    if isinstance(value, dict):
        if (bad := next((k for k in value if not isinstance(k, str)), "")) != "":
            raise ValueError(f"{where or 'the document'}: the key {bad!r} is not text; quote it")
        return {k: _plain(v, at(where, k), budget, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, at(where, i), budget, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, datetime.date):  # YAML reads an unquoted 2024-01-01 as a date
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} is not a number that can be stored")
    if isinstance(value, str) and UNSTORABLE_TEXT.search(value):
        raise ValueError(f"{where}: the text has a NUL or an unpaired surrogate character")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"{where}: a {type(value).__name__} value cannot be stored; quote it")


class Yaml12Loader(yaml.SafeLoader):
    """YAML read as promptfoo (js-yaml) reads it, closer to YAML 1.2 than PyYAML's 1.1: only
    true/false are booleans (`Yes`, `no`, `on` stay text), `1:30` is text, not a number of
    minutes, and `010` is ten. Dates stay dates (stored as their ISO text)."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp) for tag, regexp in resolvers if not tag.endswith((":bool", ":int", ":float"))
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in [
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
]:
    Yaml12Loader.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first)
    )


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 16) if text.startswith("0x") else int(text, 10)


Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=Yaml12Loader)  # noqa: S506 -- a SafeLoader subclass


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse(text: str, suffix: str, filename: str) -> Any:
    """YAML or JSON into plain data; syntax errors come with their line and column."""
    try:
        if suffix == ".json":
            return _plain(json.loads(text, parse_constant=_reject_constant), "", [MAX_NODES])
        return _plain(load_yaml(text), "", [MAX_NODES])
    except json.JSONDecodeError as exc:
        raise fail(filename, f"line {exc.lineno}, column {exc.colno}", exc.msg) from exc
    except yaml.MarkedYAMLError as exc:
        mark, context = exc.problem_mark, f" ({exc.context})" if exc.context else ""
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise fail(filename, where, f"{exc.problem}{context}") from exc
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        raise fail(filename, "", str(exc)) from exc
    except RecursionError as exc:
        raise fail(filename, "", "the document is nested too deeply") from exc
