"""What a case's detail shows beyond its row in a report (the report, the live page and the
review page show the same detail)."""

from __future__ import annotations

import json

from testruns.catalog.prompts import render_prompt
from testruns.models import TestResult, TestRun
from testruns.reporting.verdicts import wilson


def case_detail(run: TestRun, result: TestResult) -> dict:
    """What a case's detail shows beyond its row: the system prompt rendered with the case's
    variables (the result keeps the rendered prompt only), the variables as JSON, and its
    calls to the model apart from the retries they took; with repeats, its pass rate over
    them and the 95 % Wilson interval around it (reporting.verdicts)."""
    try:
        system = render_prompt(run.version.system_prompt, result.variables or {})
    except Exception as exc:  # a template error is the case's, shown where it belongs
        system = f"(the system prompt could not be rendered: {exc})"
    trials = len(result.repeat_results) if isinstance(result.repeat_results, list) else 0
    passes = sum(1 for r in result.repeat_results or [] if isinstance(r, dict) and r.get("passed"))
    return {
        "system_prompt": system,
        "variables": json.dumps(result.variables, indent=2, ensure_ascii=False),
        "calls": max(0, result.attempts - result.retries),
        "trials": trials,
        "passes": passes,
        "interval": wilson(passes, trials) if trials else None,
    }
