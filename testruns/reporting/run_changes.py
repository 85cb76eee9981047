"""What changed in a finished run against its baseline, in one function (`what_changed`), so
that notifications, and whatever else tells people about a run, agree on it.

"Regressed" is the verdict that knows noise (reporting.verdicts, docs/statistics.md): a case
regressed when its pass rate fell from the baseline's (the card's pinned run, else the
previous completed run of the card on the provider) by more than chance explains, and it is
not flaky; "fixed" is an improvement as sure. A case that merely flipped once, with too few
trials to tell, is neither. Pass rates are the one definition (reporting.statistics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from testruns.models import TestRun
from testruns.reporting.baselines import baseline_among
from testruns.reporting.statistics import pass_rate
from testruns.reporting.verdicts import run_verdict

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
    verdict = run_verdict(baseline, run)
    return RunChanges(
        run=run,
        baseline=baseline,
        regressed=[case.case_name for case in verdict.regressions[:named]],
        regression_count=len(verdict.regressions),
        fixed=[case.case_name for case in verdict.improvements[:named]],
        fix_count=len(verdict.improvements),
        pass_rate_before=run_pass_rate(baseline),
        pass_rate_after=run_pass_rate(run),
        cost_before=baseline.cost,
        cost_after=run.cost,
    )
