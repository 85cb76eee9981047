"""Assertions on a model's output: one small check function per assertion type.

A test case holds specs such as `{"type": "contains", "value": "refund", "weight": 2}`.
`assertion_errors` validates them when a case is saved; `evaluate` runs them on an output and
combines the outcomes into a verdict. Semantics follow promptfoo where that is sensible. Nothing
here touches the network: `llm-rubric` and the other model-graded types grade through a
`grade` callable that the caller passes, `similar` embeds through an `embed` callable;
javascript assertions and transforms run in a V8 sandbox in a helper process (`sandbox`).

An outcome is passed, failed, or an error: a grader that cannot answer (it raises GradingError)
says nothing about the output, so its assertion neither passes nor fails, and the verdict
carries the error for the caller to report instead of a failure.

The modules, by family: `text` (equals, contains, regex, levenshtein, ...), `structured` (JSON),
`measures` (word count, latency, cost), `model_graded` (llm-rubric and the grader protocol),
`graded` (similar, factuality, answer-relevance, g-eval, model-graded-closedqa), `overlap`
(rouge-n, bleu), `javascript` and `sandbox` (code in V8, out of the worker's process),
`registry` (the table of types, validation and evaluation) and `contract` (what every check
shares). Other code imports only the names below, from this package.
"""

from __future__ import annotations

from testruns.catalog.assertions.contract import Embed
from testruns.catalog.assertions.model_graded import Grade, GradingError, parse_grade, rubric_prompt
from testruns.catalog.assertions.registry import (
    ASSERTION_TYPES,
    MODEL_CALLS,
    REFUSED_TYPES,
    AssertionOutcome,
    CaseVerdict,
    assertion_errors,
    check_assertion,
    evaluate,
)

__all__ = [
    "ASSERTION_TYPES",
    "AssertionOutcome",
    "CaseVerdict",
    "Embed",
    "Grade",
    "GradingError",
    "MODEL_CALLS",
    "REFUSED_TYPES",
    "assertion_errors",
    "check_assertion",
    "evaluate",
    "parse_grade",
    "rubric_prompt",
]
