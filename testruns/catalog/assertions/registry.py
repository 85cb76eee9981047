"""The table of assertion types, and what runs it: `assertion_errors` validates a case's specs,
`check_assertion` runs one, `evaluate` runs them all and combines the outcomes into a verdict."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from testruns.catalog.assertions import (
    graded,
    javascript,
    measures,
    model_graded,
    overlap,
    structured,
    text,
)
from testruns.catalog.assertions.contract import (
    MISSING,
    Check,
    Context,
    Embed,
    Result,
    Validate,
    binary,
    is_limit,
    json_type,
    show,
    show_typed,
)
from testruns.catalog.assertions.model_graded import Grade
from testruns.catalog.assertions.sandbox import SandboxError

# promptfoo's keys of an assertion that mean something here: `threshold` (the score at which
# a scoring type passes), `metric` (a name for reports, kept for the round trip) and
# `transform` (JavaScript run on the output first).
_KEYS = frozenset({"type", "value", "weight", "threshold", "metric", "transform"})
REFUSED_TYPES = {
    "python": "python assertions run Python code on the server, with the worker's access to "
    "the database and every secret; this app runs custom code only in its JavaScript sandbox: "
    "rewrite it as a javascript assertion",
}
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
    "icontains-any": (text.check_icontains_any, text.strings_problems),
    "icontains-all": (text.check_icontains_all, text.strings_problems),
    "contains-json": (
        structured.check_contains_json,
        lambda value: structured.schema_problems(value, required=False),
    ),
    "is-valid-openai-tools-call": (structured.check_openai_tools_call, structured.tools_problems),
    "javascript": (javascript.check_javascript, javascript.javascript_problems),
    "rouge-n": (overlap.check_rouge_n, overlap.reference_problems),
    "bleu": (overlap.check_bleu, overlap.references_problems),
    "similar": (graded.check_similar, overlap.references_problems),
    "factuality": (graded.check_factuality, text.string_problems),
    "model-graded-closedqa": (graded.check_closedqa, text.string_problems),
    "g-eval": (graded.check_g_eval, text.string_problems),
    "answer-relevance": (graded.check_answer_relevance, lambda value: []),
}
# Inverting suits pass/fail facts about the text and the scores promptfoo inverts (1 - score),
# not budgets or graders.
_NEGATABLE = (
    "equals contains icontains contains-any contains-all icontains-any icontains-all "
    "starts-with regex is-json contains-json javascript rouge-n bleu similar"
).split()
# How many model calls (gradings and embeddings requests) one assertion of a type may make, for
# the case's time budget.
MODEL_CALLS = {
    "llm-rubric": 1,
    "factuality": 1,
    "model-graded-closedqa": 1,
    "g-eval": 2,
    "answer-relevance": graded.RELEVANCE_QUESTIONS + 1,
    "similar": 1,
    "not-similar": 1,
}
# Types whose check reads the assertion's threshold; on the others it is kept but unused.
SCORED_TYPES = frozenset(
    "javascript rouge-n bleu similar g-eval answer-relevance llm-rubric levenshtein".split()
)
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
    if name in REFUSED_TYPES:
        return [f"{name} is not supported: {REFUSED_TYPES[name]}"]
    if name not in ASSERTION_TYPES:
        return [_unknown_type(name)]
    validate = _TYPES[name.removeprefix("not-")][1]
    return (
        [f"unknown key {show(str(key), 40)}" for key in spec if key not in _KEYS]
        + validate(spec.get("value", MISSING))
        + _weight_problems(spec.get("weight", MISSING))
        + _extra_problems(spec)
    )


def _extra_problems(spec: dict[str, Any]) -> list[str]:
    problems = []
    threshold = spec.get("threshold", MISSING)
    if threshold is not MISSING and (isinstance(threshold, bool) or not is_limit(threshold)):
        problems.append(f"threshold must be a number >= 0, got {show_typed(threshold)}")
    metric = spec.get("metric", MISSING)
    if metric is not MISSING and not (isinstance(metric, str) and metric.strip()):
        problems.append(f"metric must be a non-blank string, got {show_typed(metric)}")
    if "transform" in spec:
        problems += javascript.transform_problems(spec["transform"])
    return problems


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
    embed: Embed | None = None,
    variables: dict[str, Any] | None = None,
    prompt: str = "",
) -> AssertionOutcome:
    """Run one assertion on an output, after its transform if it has one. A malformed spec
    gives a failed outcome, not an error."""
    name = spec.get("type") if isinstance(spec, dict) else None
    name = name if isinstance(name, str) else "invalid"
    weight = spec.get("weight", 1) if isinstance(spec, dict) else 1
    weight = 1.0 if _weight_problems(weight) else float(weight)
    problems = _spec_problems(spec)
    if problems:
        reason = "invalid assertion: " + "; ".join(problems)
        return AssertionOutcome(name, False, 0.0, reason, weight)
    check = _TYPES[name.removeprefix("not-")][0]
    threshold = spec.get("threshold")
    ctx = Context(
        output,
        latency_ms,
        cost,
        grade,
        embed,
        variables or {},
        prompt,
        None if threshold is None else float(threshold),
        output,
    )
    try:
        if "transform" in spec:
            value = javascript.apply_transforms(spec["transform"], ctx)
            ctx = dataclasses.replace(ctx, output=javascript.output_text(value), output_value=value)
        result = check(spec.get("value", MISSING), ctx)
    except structured.NotJson as exc:
        result = binary(False, str(exc))
    except SandboxError as exc:
        result = binary(False, f"transform: {exc}")
    if name not in _TYPES and not result.error:  # a not- variant: the base result, inverted
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
    embed: Embed | None = None,
    variables: dict[str, Any] | None = None,
    prompt: str = "",
) -> CaseVerdict:
    """Run every assertion and combine the outcomes.

    The score is the weighted mean of the outcome scores (1.0 with no assertions). The case
    passes when every assertion passes or, when a threshold is given, when the score reaches it.
    An assertion that could not be checked (an error) fails the verdict whatever the threshold,
    and `error` names the first one ("llm-rubric (assertion 2): the grader ... could not
    answer: ...").
    """
    outcomes = [
        check_assertion(
            spec,
            output=output,
            latency_ms=latency_ms,
            cost=cost,
            grade=grade,
            embed=embed,
            variables=variables,
            prompt=prompt,
        )
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
