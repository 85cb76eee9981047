"""Regressions: which run a report compares against (its baseline), how results of two runs
line up (by test case, by name once the case is gone), and what changed between them.
"""

from __future__ import annotations

from dataclasses import dataclass

from testruns.live.snapshots import COMPLETED_RUNS
from testruns.models import TestResult, TestRun
from testruns.reporting.access import runs_visible_to
from testruns.reporting.statistics import EVALUATED


def baseline_for(user, run: TestRun) -> TestRun | None:
    """The card's pinned baseline, else the previous completed run of the same card and
    provider; only among runs the user may see."""
    visible = runs_visible_to(user)
    pinned = run.card.baseline_run_id
    if pinned and pinned != run.pk:
        baseline = visible.filter(pk=pinned).first()
        if baseline is not None:
            return baseline
    return (
        visible.filter(
            card=run.card_id,
            provider=run.provider_id,
            status__in=COMPLETED_RUNS,
            queued_at__lt=run.queued_at,
        )
        .exclude(pk=run.pk)
        .order_by("-queued_at", "-pk")
        .first()
    )


def case_key(case_id: int | None, case_name: str) -> str:
    """Results of different runs line up by test case (by name once the case is gone)."""
    return f"c{case_id}" if case_id is not None else f"n:{case_name}"


@dataclass
class CaseChange:
    key: str
    position: int
    case_name: str
    before: str
    after: str


def changes_since(baseline: TestRun, run: TestRun) -> dict[str, list[CaseChange]]:
    """Regressions (passed in the baseline, not now) and fixes (the reverse)."""
    before = {
        case_key(c, n): s
        for c, n, s in baseline.results.values_list("case_id", "case_name", "status")
    }
    regressions, fixes = [], []
    for case_id, name, position, status in run.results.values_list(
        "case_id", "case_name", "position", "status"
    ).order_by("position"):
        key = case_key(case_id, name)
        old = before.get(key)
        if old is None or status not in EVALUATED or old not in EVALUATED:
            continue
        change = CaseChange(key, position, name, old, status)
        if old == TestResult.Status.PASSED and status != TestResult.Status.PASSED:
            regressions.append(change)
        elif old != TestResult.Status.PASSED and status == TestResult.Status.PASSED:
            fixes.append(change)
    return {"regressions": regressions, "fixes": fixes}
