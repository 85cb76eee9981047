"""The table of assertion types, and what runs it: `assertion_errors` validates a case's specs,
`check_assertion` runs one, `evaluate` runs them all and combines the outcomes into a verdict."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from testruns.catalog.assertions import measures, model_graded, structured, text
from testruns.catalog.assertions.contract import (
    MISSING,
    Check,
    Context,
    Result,
    Validate,
    binary,
    is_limit,
    json_type,
    show,
    show_typed,
)
from testruns.catalog.assertions.model_graded import Grade

_KEYS = frozenset({"type", "value", "weight"})
# A weighted mean can land a hair below the exact fraction (weights 0.1 + 0.7 out of 1.0 give
# 0.7999999999999999); a threshold of 0.8 should still pass.
_SCORE_EPSILON = 1e-9


@dataclass(frozen=True)
class AssertionOutcome:
    type: str
    passed: bool
    score: float
    reason: str
    weight: float
    # The assertion could not be checked (its grader did not answer); `passed` is False.
    error: bool = False

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.error:  # stored outcomes keep their shape; only errors say so
            del data["error"]
        return data


@dataclass(frozen=True)
class CaseVerdict:
    passed: bool
    score: float
    outcomes: list[AssertionOutcome]
    # What kept an assertion from being checked, naming it: the case is an error, not a failure.
    error: str | None = None


_TYPES: dict[str, tuple[Check, Validate]] = {
    "equals": (text.check_equals, text.equals_problems),
    "contains": (text.check_contains, text.string_problems),
    "icontains": (text.check_icontains, text.string_problems),
    "contains-any": (text.check_contains_any, text.strings_problems),
    "contains-all": (text.check_contains_all, text.strings_problems),
    "starts-with": (text.check_starts_with, text.string_problems),
    "regex": (text.check_regex, text.regex_problems),
    "is-json": (
        structured.check_is_json,
        lambda value: structured.schema_problems(value, required=False),
    ),
    "json-schema": (
        structured.check_is_json,
        lambda value: structured.schema_problems(value, required=True),
    ),
    "json-path": (structured.check_json_path, structured.json_path_problems),
    "levenshtein": (text.check_levenshtein, text.levenshtein_problems),
    "word-count": (measures.check_word_count, measures.word_count_problems),
    "latency": (measures.check_latency, measures.limit_problems),
    "cost": (measures.check_cost, measures.limit_problems),
    "llm-rubric": (model_graded.check_llm_rubric, text.string_problems),
}
# Inverting suits these pass/fail facts about the text, not budgets, fuzzy scores or graders.
_NEGATABLE = "equals contains icontains contains-any contains-all starts-with regex is-json".split()
ASSERTION_TYPES: frozenset[str] = frozenset(_TYPES) | {f"not-{name}" for name in _NEGATABLE}


def _weight_problems(weight: object) -> list[str]:
    if weight is MISSING or (is_limit(weight) and weight > 0):
        return []
    return [f"weight must be a positive number, got {show_typed(weight)}"]


def _unknown_type(name: str) -> str:
    """Name the type that was most likely meant: a list of all of them buries the one typo."""
    unknown = f"unknown type {show(name, 40)}"
    if name.startswith("not-") and name.removeprefix("not-") in _TYPES:
        return f"{unknown}; {name.removeprefix('not-')} has no not- variant"
    near = difflib.get_close_matches(name.strip().lower(), sorted(ASSERTION_TYPES), n=1)
    if near:
        return f"{unknown}; did you mean {show(near[0])}?"
    return f"{unknown}; expected one of: " + ", ".join(sorted(ASSERTION_TYPES))


def _spec_problems(spec: object) -> list[str]:
    if not isinstance(spec, dict):
        return [f"must be an object, got {json_type(spec)}"]
    name = spec.get("type", MISSING)
    if name is MISSING:
        return ['"type" is missing']
    if not isinstance(name, str):
        return [f'"type" must be a string, got {json_type(name)}']
    if name not in ASSERTION_TYPES:
        return [_unknown_type(name)]
    validate = _TYPES[name.removeprefix("not-")][1]
    return (
        [f"unknown key {show(str(key), 40)}" for key in spec if key not in _KEYS]
        + validate(spec.get("value", MISSING))
        + _weight_problems(spec.get("weight", MISSING))
    )


def assertion_errors(assertions: object) -> list[str]:
    """Problems with a test case's assertion list, one message each; [] when it is valid.
    Each names the assertion by position, and by type when the type is known."""
    if not isinstance(assertions, list):
        return [f"assertions must be a list, got {json_type(assertions)}"]
    errors = []
    for position, spec in enumerate(assertions, 1):
        name = spec.get("type") if isinstance(spec, dict) else None
        label = f" ({name})" if isinstance(name, str) and name in ASSERTION_TYPES else ""
        errors += [f"assertion {position}{label}: {problem}" for problem in _spec_problems(spec)]
    return errors


def check_assertion(
    spec: dict[str, Any],
    *,
    output: str,
    latency_ms: float | None = None,
    cost: float | Decimal | None = None,
    grade: Grade | None = None,
) -> AssertionOutcome:
    """Run one assertion on an output. A malformed spec gives a failed outcome, not an error."""
    name = spec.get("type") if isinstance(spec, dict) else None
    name = name if isinstance(name, str) else "invalid"
    weight = spec.get("weight", 1) if isinstance(spec, dict) else 1
    weight = 1.0 if _weight_problems(weight) else float(weight)
    problems = _spec_problems(spec)
    if problems:
        reason = "invalid assertion: " + "; ".join(problems)
        return AssertionOutcome(name, False, 0.0, reason, weight)
    check = _TYPES[name.removeprefix("not-")][0]
    try:
        result = check(spec.get("value", MISSING), Context(output, latency_ms, cost, grade))
    except structured.NotJson as exc:
        result = binary(False, str(exc))
    if name not in _TYPES:  # a not- variant: the base result, inverted
        reason = f"expected the opposite: {result.reason}" if result.passed else result.reason
        result = Result(not result.passed, 1.0 - result.score, reason)
    return AssertionOutcome(
        name, result.passed, min(1.0, max(0.0, result.score)), result.reason, weight, result.error
    )


def evaluate(
    assertions: list[dict[str, Any]],
    *,
    output: str,
    latency_ms: float | None = None,
    cost: float | Decimal | None = None,
    threshold: float | None = None,
    grade: Grade | None = None,
) -> CaseVerdict:
    """Run every assertion and combine the outcomes.

    The score is the weighted mean of the outcome scores (1.0 with no assertions). The case
    passes when every assertion passes or, when a threshold is given, when the score reaches it.
    An assertion that could not be checked (an error) fails the verdict whatever the threshold,
    and `error` names the first one ("llm-rubric (assertion 2): the grader ... could not
    answer: ...").
    """
    outcomes = [
        check_assertion(spec, output=output, latency_ms=latency_ms, cost=cost, grade=grade)
        for spec in assertions
    ]
    total = sum(outcome.weight for outcome in outcomes)
    score = sum(o.weight * o.score for o in outcomes) / total if total else 1.0
    if threshold is None:
        passed = all(outcome.passed for outcome in outcomes)
    else:
        passed = score >= float(threshold) - _SCORE_EPSILON
    errors = [
        f"{outcome.type} (assertion {position}): {outcome.reason}"
        for position, outcome in enumerate(outcomes, 1)
        if outcome.error
    ]
    if errors:
        return CaseVerdict(False, score, outcomes, errors[0])
    return CaseVerdict(passed, score, outcomes)
