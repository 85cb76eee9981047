"""Assertions on the output's text: equals, contains, icontains, contains-any, contains-all,
icontains-any, icontains-all, starts-with, regex (their not- variants are inverted by the
registry) and levenshtein."""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Callable
from typing import Any

from testruns.catalog.assertions.contract import (
    MISSING,
    Check,
    Context,
    Result,
    binary,
    count_problems,
    json_type,
    object_problems,
    quote,
    show,
    show_typed,
)
from testruns.catalog.assertions.structured import load_json, same_json

# Pure-Python edit distance over more cells than this would take seconds (4M is about 1 s).
_MAX_EDIT_CELLS = 4_000_000


# -- Checks ----------------------------------------------------------------------------------


def check_equals(value: Any, ctx: Context) -> Result:
    if isinstance(value, dict | list):
        doc = load_json(ctx.output)
        if same_json(doc, value):
            return binary(True, f"output is the expected JSON {show(value)}")
        return binary(False, f"expected JSON {show(value)}, got {show(doc)}")
    if ctx.output == value:
        return binary(True, f"output equals {quote(value)}")
    return binary(False, f"expected exactly {quote(value)}, got {quote(ctx.output)}")


def _text_check(
    test: Callable[[str, str], bool], does: str, does_not: str, note: str = ""
) -> Check:
    """contains, icontains and starts-with differ only in the test and its wording."""

    def check(value: str, ctx: Context) -> Result:
        if test(ctx.output, value):
            return binary(True, f"output {does} {quote(value)}{note}")
        seen = quote(ctx.output)
        return binary(False, f"output {does_not} {quote(value)}{note}; output: {seen}")

    return check


def _casefold_in(output: str, value: str) -> bool:
    return value.casefold() in output.casefold()


check_contains = _text_check(operator.contains, "contains", "does not contain")
check_icontains = _text_check(_casefold_in, "contains", "does not contain", " (ignoring case)")
check_starts_with = _text_check(str.startswith, "starts with", "does not start with")


def check_contains_any(value: list[str], ctx: Context) -> Result:
    found = [item for item in value if item in ctx.output]
    if found:
        return binary(True, f"output contains {quote(found[0])}")
    return binary(False, f"output contains none of {show(value)}; output: {quote(ctx.output)}")


def check_contains_all(value: list[str], ctx: Context) -> Result:
    missing = [item for item in value if item not in ctx.output]
    if not missing:
        return binary(True, f"output contains all of {show(value)}")
    return binary(False, f"output is missing {show(missing)}; output: {quote(ctx.output)}")


def check_icontains_any(value: list[str], ctx: Context) -> Result:
    output = ctx.output.casefold()
    found = [item for item in value if item.casefold() in output]
    if found:
        return binary(True, f"output contains {quote(found[0])} (ignoring case)")
    return binary(
        False, f"output contains none of {show(value)} (ignoring case); output: {quote(ctx.output)}"
    )


def check_icontains_all(value: list[str], ctx: Context) -> Result:
    output = ctx.output.casefold()
    missing = [item for item in value if item.casefold() not in output]
    if not missing:
        return binary(True, f"output contains all of {show(value)} (ignoring case)")
    return binary(
        False, f"output is missing {show(missing)} (ignoring case); output: {quote(ctx.output)}"
    )


def check_regex(value: str, ctx: Context) -> Result:
    match = re.search(value, ctx.output)
    if match:
        return binary(True, f"output matches /{value[:80]}/ at {quote(match.group(0))}")
    return binary(False, f"output does not match /{value[:80]}/; output: {quote(ctx.output)}")


def _edit_distance(a: str, b: str) -> int | None:
    """Levenshtein distance, or None when the strings are too long to compare in time."""
    # A shared prefix and suffix cost nothing; trimming them keeps near-matches cheap.
    prefix = len(os.path.commonprefix([a, b]))
    a, b = a[prefix:], b[prefix:]
    suffix = len(os.path.commonprefix([a[::-1], b[::-1]]))
    a, b = a[: len(a) - suffix], b[: len(b) - suffix]
    if len(a) * len(b) > _MAX_EDIT_CELLS:
        return None
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            cost = previous[j - 1] + (char_a != char_b)
            current.append(min(previous[j] + 1, current[j - 1] + 1, cost))
        previous = current
    return previous[-1]


def check_levenshtein(value: dict[str, Any], ctx: Context) -> Result:
    expected, limit = value["expected"], value["max"]
    distance = _edit_distance(ctx.output, expected)
    if distance is None:
        return binary(
            False,
            f"output ({len(ctx.output)} chars) and expected text "
            f"({len(expected)} chars) are too long to compare",
        )
    longest = max(len(ctx.output), len(expected))
    score = 1.0 - distance / longest if longest else 1.0
    if distance <= limit:
        return Result(True, score, f"edit distance to {quote(expected)} is {distance}")
    return Result(
        False,
        score,
        f"edit distance to {quote(expected)} is {distance}, over the "
        f"maximum {limit}; output: {quote(ctx.output)}",
    )


# -- Validators ------------------------------------------------------------------------------


def string_problems(value: object, *, blank_ok: bool = False) -> list[str]:
    if value is MISSING:
        return ["value is required"]
    if not isinstance(value, str):
        return [f"value must be a string, got {json_type(value)}"]
    return [] if blank_ok or value.strip() else ["value must not be blank"]


def equals_problems(value: object) -> list[str]:
    if value is MISSING:
        return ["value is required"]
    if isinstance(value, str | dict | list):
        return []
    return [f"value must be a string, object or array, got {json_type(value)}"]


def strings_problems(value: object) -> list[str]:
    if value is MISSING:
        return ["value is required"]
    if not isinstance(value, list) or not value:
        return [f"value must be a non-empty array of strings, got {show_typed(value)}"]
    return [
        f"value[{i}] must be a non-blank string, got {show_typed(item)}"
        for i, item in enumerate(value)
        if not isinstance(item, str) or not item.strip()
    ]


def regex_problems(value: object) -> list[str]:
    problems = string_problems(value, blank_ok=True)
    if problems:
        return problems
    try:
        re.compile(value)
    except (re.error, OverflowError, RecursionError) as exc:
        return [f"invalid regular expression: {exc}"]
    return []


def levenshtein_problems(value: object) -> list[str]:
    problems = object_problems(value, required={"expected", "max"}, optional=set())
    if problems:
        return problems
    if not isinstance(value["expected"], str):
        problems.append(f'value "expected" must be a string, got {json_type(value["expected"])}')
    return problems + count_problems(value, "max")
