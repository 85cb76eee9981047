"""What every check shares: the context it reads, the result it gives, the marker for a spec
without a value, the shape checks that several types' validators reuse, and how reasons and
problems show values (quoted, shortened, on one line)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for the annotation: model_graded imports this module
    from testruns.catalog.assertions.model_graded import Grade

# The embeddings protocol, like the grader's: texts in, one vector per text out; the caller
# passes it, and it raises GradingError when the provider cannot answer.
Embed = Callable[[list[str]], list[list[float]]]

MISSING: Any = object()  # a spec without "value", as opposed to "value": null
# Counts are capped so they stay printable and comparable; no output nears a billion words.
MAX_COUNT = 1_000_000_000


@dataclass(frozen=True)
class Context:
    """What a check reads besides its value: the output and what the call measured, the
    case's variables and prompt (javascript, the model-graded types), the callables that
    reach models, and the assertion's own threshold. `output_value` is what a transform
    made of the output (data, for javascript), `output` its text."""

    output: str
    latency_ms: float | None
    cost: float | Decimal | None
    grade: Grade | None
    embed: Embed | None = None
    variables: dict[str, Any] = field(default_factory=dict)
    prompt: str = ""
    threshold: float | None = None
    output_value: Any = None


@dataclass(frozen=True)
class Result:
    passed: bool
    score: float
    reason: str
    error: bool = False


# A check gets a value that passed its type's validator; a validator returns the problems with
# a value, [] when it is fine.
Check = Callable[[Any, Context], Result]
Validate = Callable[[object], list[str]]


def binary(passed: bool, reason: str) -> Result:
    return Result(passed, 1.0 if passed else 0.0, reason)


def quote(text: str, limit: int = 80) -> str:
    """A JSON-quoted excerpt, so newlines and long outputs stay on one short line."""
    if len(text) <= limit:
        return json.dumps(text, ensure_ascii=False)
    return f"{json.dumps(text[:limit] + '…', ensure_ascii=False)} ({len(text)} chars)"


def show(value: object, limit: int = 80) -> str:
    """A value as JSON, shortened; repr() for what JSON cannot spell (specs built in Python)."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def show_typed(value: object) -> str:
    return f"{json_type(value)} {show(value, 40)}"


def object_problems(value: object, *, required: set[str], optional: set[str]) -> list[str]:
    """The shape of an object value: the keys it must have and those it may have."""
    names = ", ".join(f'"{key}"' for key in sorted(required | optional))
    if not isinstance(value, dict):
        got = "nothing" if value is MISSING else json_type(value)
        return [f"value must be an object with {names}, got {got}"]
    return [f'value is missing "{key}"' for key in sorted(required) if key not in value] + [
        f"value has unknown key {show(str(key))}" for key in value if key not in required | optional
    ]


def count_problems(value: dict[str, Any], key: str) -> list[str]:
    item = value.get(key)
    if key not in value or (type(item) is int and 0 <= item <= MAX_COUNT):
        return []
    return [f'value "{key}" must be a whole number from 0 to {MAX_COUNT}, got {show_typed(item)}']


def is_limit(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:  # float() also refuses ints past 1e308, which could be neither printed nor summed
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:
        return False
