"""What changed in a finished run against its baseline, in one function (`what_changed`), so
that notifications, and whatever else tells people about a run, agree on it, and the rule for
"regressed" can be replaced here alone (noise-aware verdicts, issue 16).

Today's rule is the report's: a case regressed when it passed in the baseline (the card's
pinned run, else the previous completed run of the card on the provider) and does not pass
now; a fix is the reverse. Pass rates are the one definition (reporting.statistics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from testruns.models import TestRun
from testruns.reporting.baselines import baseline_among, changes_since
from testruns.reporting.statistics import pass_rate

# How many regressed and fixed cases a notice names (it counts them all).
NAMED_CASES = 20


@dataclass(frozen=True)
class RunChanges:
    run: TestRun
    baseline: TestRun | None
    regressed: list[str] = field(default_factory=list)
    regression_count: int = 0
    fixed: list[str] = field(default_factory=list)
    fix_count: int = 0
    pass_rate_before: float | None = None
    pass_rate_after: float | None = None
    cost_before: Decimal | None = None
    cost_after: Decimal = Decimal(0)

    @property
    def regression(self) -> bool:
        return self.regression_count > 0


def run_pass_rate(run: TestRun) -> float | None:
    return pass_rate(run.passed_count, run.failed_count, run.error_count)


def what_changed(run: TestRun, *, named: int = NAMED_CASES) -> RunChanges:
    """The run against its baseline (among all runs: a notice is not one user's view):
    the cases that regressed and were fixed (the first `named` of each in case order, and their
    counts), the pass rate before and after, and the cost before and after."""
    baseline = baseline_among(TestRun.objects.select_related("card", "provider"), run)
    if baseline is None:
        return RunChanges(
            run=run, baseline=None, pass_rate_after=run_pass_rate(run), cost_after=run.cost
        )
    changes = changes_since(baseline, run, limit=named)
    return RunChanges(
        run=run,
        baseline=baseline,
        regressed=[change.case_name for change in changes["regressions"]],
        regression_count=changes["regression_count"],
        fixed=[change.case_name for change in changes["fixes"]],
        fix_count=changes["fix_count"],
        pass_rate_before=run_pass_rate(baseline),
        pass_rate_after=run_pass_rate(run),
        cost_before=baseline.cost,
        cost_after=run.cost,
    )
