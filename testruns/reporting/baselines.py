"""Regressions: which run a report compares against (its baseline), how results of two runs
line up (by test case, by name once the case is gone), and what changed between them.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connection
from django.db.models import QuerySet

from testruns.live.snapshots import COMPLETED_RUNS
from testruns.models import TestRun
from testruns.reporting.access import runs_visible_to
from testruns.reporting.statistics import EVALUATED


def baseline_for(user, run: TestRun) -> TestRun | None:
    """The card's pinned baseline, else the previous completed run of the same card and
    provider; only among runs the user may see."""
    return baseline_among(runs_visible_to(user), run)


def baseline_among(visible: QuerySet[TestRun], run: TestRun) -> TestRun | None:
    """baseline_for among `visible`: all runs for a notification nobody is looking at, or for
    the CLI, run by an operator."""
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


# How many regressions and fixes a report lists (it counts them all).
LISTED_CHANGES = 50

# In SQL, as case_key() says it: results line up by case id, by name once the case is gone.
_KEY = "CASE WHEN {t}.case_id IS NOT NULL THEN 'c' || {t}.case_id ELSE 'n:' || {t}.case_name END"

# A case's verdict in the baseline is its last result there by position (as a dict built in
# case order would keep it). Changes are counted per kind; the first `limit` of each kind in
# case order come back, and any change among `positions` (the page of cases shown).
_CHANGES_SQL = f"""
WITH baseline AS (
    SELECT DISTINCT ON (key) key, status FROM (
        SELECT {_KEY.format(t="b")} AS key, b.status, b.position
        FROM testruns_testresult b WHERE b.run_id = %(baseline)s
    ) keyed
    ORDER BY key, position DESC
), changed AS (
    SELECT r.position, r.case_id, r.case_name, b.status AS before, r.status AS after,
           b.status = 'passed' AS regression
    FROM testruns_testresult r JOIN baseline b ON b.key = {_KEY.format(t="r")}
    WHERE r.run_id = %(run)s AND r.status = ANY(%(evaluated)s)
      AND b.status = ANY(%(evaluated)s) AND (b.status = 'passed') <> (r.status = 'passed')
), numbered AS (
    SELECT changed.*,
           row_number() OVER (PARTITION BY regression ORDER BY position) AS nth,
           count(*) OVER (PARTITION BY regression) AS total
    FROM changed
)
SELECT position, case_id, case_name, before, after, regression, nth, total FROM numbered
WHERE nth <= %(limit)s OR position = ANY(%(positions)s)
ORDER BY position
"""


def changes_since(
    baseline: TestRun,
    run: TestRun,
    *,
    limit: int = LISTED_CHANGES,
    positions: list[int] | tuple[int, ...] = (),
) -> dict:
    """Regressions (passed in the baseline, not now) and fixes (the reverse), worked out in
    PostgreSQL in one query, so a 10,000-case run sends back no more than it shows:
    "regressions" and "fixes" (the first `limit` of each, in case order), their counts
    "regression_count" and "fix_count", and "marks": position -> "regression" or "fix" for
    the changed cases among `positions`."""
    changes: dict = {"regressions": [], "fixes": [], "regression_count": 0, "fix_count": 0}
    marks: dict[int, str] = {}
    wanted = set(positions)
    with connection.cursor() as cursor:
        cursor.execute(
            _CHANGES_SQL,
            {
                "baseline": baseline.pk,
                "run": run.pk,
                "evaluated": list(EVALUATED),
                "limit": limit,
                "positions": list(wanted),
            },
        )
        for position, case_id, name, before, after, regression, nth, total in cursor:
            kind = "regression" if regression else "fix"
            changes[f"{kind}_count"] = total
            if nth <= limit:
                change = CaseChange(case_key(case_id, name), position, name, before, after)
                changes["regressions" if regression else "fixes"].append(change)
            if position in wanted:
                marks[position] = kind
    return changes | {"marks": marks}
