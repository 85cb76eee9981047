"""The one definition of a pass rate, shared by reports, history trends, exports, the CLI's
exit code and the admin.

Pass rate = passed / (passed + failed + errors): over the evaluated cases. A skipped case
(stop on first failure, a cancelled run) and one that never ran are not evaluated and do not
count; a provider or template error counts against the rate. None when nothing was
evaluated, so "no verdict" never reads as 0 %. (docs/api.md: "passed over evaluated cases,
skipped ones not counted".)
"""

from __future__ import annotations

from testruns.models import TestResult

# The result statuses that carry a verdict.
EVALUATED = (TestResult.Status.PASSED, TestResult.Status.FAILED, TestResult.Status.ERROR)


def pass_rate(passed: int, failed: int, errors: int) -> float | None:
    """Passed over evaluated cases, from 0.0 to 1.0; None when none was evaluated."""
    evaluated = passed + failed + errors
    return passed / evaluated if evaluated else None
