"""The one definition of a pass rate, shared by reports, history trends, exports, the CLI's
exit code and the admin.

Pass rate = passed / (passed + failed + errors): over the evaluated cases. A skipped case
(stop on first failure, a cancelled run) and one that never ran are not evaluated and do not
count; a provider or template error counts against the rate. None when nothing was
evaluated, so "no verdict" never reads as 0 %. (docs/api.md: "passed over evaluated cases,
skipped ones not counted".)
"""

from __future__ import annotations

from django.db.models import Case, Count, F, Q, Value, When

from testruns.models import TestResult, TestRun

# The result statuses that carry a verdict.
EVALUATED = (TestResult.Status.PASSED, TestResult.Status.FAILED, TestResult.Status.ERROR)


def pass_rate(passed: int, failed: int, errors: int) -> float | None:
    """Passed over evaluated cases, from 0.0 to 1.0; None when none was evaluated."""
    evaluated = passed + failed + errors
    return passed / evaluated if evaluated else None


def reviewed_pass_rate(run: TestRun) -> dict:
    """The run's pass rate with people's reviews counted: a reviewed result counts as the
    reviewer judged it, the others as their automatic verdict (an error as a failure); with
    how many results were reviewed and how many verdicts overridden. One query."""
    automatic = Case(
        When(status=TestResult.Status.PASSED, then=Value("passed")), default=Value("failed")
    )
    decided = Q(review__verdict__gt="")
    counts = (
        run.results.filter(status__in=EVALUATED)
        .annotate(automatic=automatic)
        .annotate(judged=Case(When(decided, then=F("review__verdict")), default=F("automatic")))
        .aggregate(
            evaluated=Count("pk"),
            passed=Count("pk", filter=Q(judged="passed")),
            reviewed=Count("pk", filter=decided),
            overridden=Count("pk", filter=decided & ~Q(review__verdict=F("automatic"))),
        )
    )
    rate = counts["passed"] / counts["evaluated"] if counts["evaluated"] else None
    return counts | {"pass_rate": rate}
