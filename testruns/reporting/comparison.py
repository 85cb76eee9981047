"""Runs side by side: cases as rows, runs as columns, for the comparison page. Rows line up by
`baselines.case_key`. PostgreSQL lines them up and pages them, so a page of rows costs two
queries (the rows with their total, then their detail) whether the runs hold 10 cases or
10,000.
"""

from __future__ import annotations

from collections.abc import Sequence

from django.core.paginator import Page, Paginator
from django.db import connection
from django.db.models import Q

from testruns.models import TestResult, TestRun
from testruns.reporting.baselines import case_key

# The runs' results lined up as case_key() lines them up (by case id, by name once the case
# is gone), each with its run's column (1-based). A row takes its name and position from the
# first column holding the case; a cell holds the status of the case's last result in that
# run. A row differs when some run lacks the case or the statuses are not all the same. The
# total comes with the page (a window over the rows shown), so a page is one query.
_PAGE_SQL = """
WITH keyed AS (
    SELECT r.case_id, CASE WHEN r.case_id IS NULL THEN r.case_name END AS orphan,
           r.case_name, r.position, r.status,
           array_position(%(runs)s::bigint[], r.run_id) AS col
    FROM testruns_testresult r WHERE r.run_id = ANY(%(runs)s::bigint[])
), grouped AS (
    SELECT case_id, orphan,
           (array_agg(case_name ORDER BY col, position))[1] AS case_name,
           (array_agg(position ORDER BY col, position))[1] AS position,
           array_agg(col ORDER BY col, position) AS cols,
           array_agg(status ORDER BY col, position) AS statuses,
           count(DISTINCT col) AS present,
           min(status) <> max(status) AS mixed
    FROM keyed GROUP BY case_id, orphan
), shown AS (
    SELECT * FROM grouped
    WHERE NOT %(differences_only)s OR present < %(columns)s OR mixed
)
SELECT case_id, case_name, position, cols, statuses, count(*) OVER () FROM shown
ORDER BY position, case_name COLLATE "C", case_id, orphan
LIMIT %(limit)s OFFSET %(offset)s
"""


class SideBySide(Sequence):
    """Cases as rows, runs as columns, in case order: each row {"key", "case_name",
    "position", "statuses": [status|None per run], "differs"}. Lazy: a slice (a Paginator's
    page) is one query, which also tells the length; pages never load every row. `paginate`
    pages it in one query; fill in the rows' `cells` with `fill_cells`."""

    def __init__(self, runs: list[TestRun], *, differences_only: bool = False):
        self.runs = runs
        self.differences_only = differences_only
        self._total: int | None = None if runs else 0
        self._fetched: dict[int, tuple[int, list[dict]]] = {}  # start -> (stop, rows)

    def fetch(self, start: int, stop: int) -> list[dict]:
        """Rows start..stop (one query), kept for the slice that asks for them."""
        if not self.runs or stop <= start:
            return []
        params = {
            "runs": [run.pk for run in self.runs],
            "columns": len(self.runs),
            "differences_only": self.differences_only,
            "limit": stop - start,
            "offset": start,
        }
        with connection.cursor() as cursor:
            cursor.execute(_PAGE_SQL, params)
            found = cursor.fetchall()
        if found:
            self._total = found[0][-1]
        elif start == 0:
            self._total = 0
        rows = [self._row(*values[:-1]) for values in found]
        self._fetched[start] = (stop, rows)
        return rows

    def __len__(self) -> int:
        if self._total is None:
            self.fetch(0, 1)  # tells the total (0 when it finds no row)
        return self._total or 0

    def __getitem__(self, index):
        if not isinstance(index, slice):
            index = index + len(self) if index < 0 else index
            rows = self[index : index + 1] if index >= 0 else []
            if not rows:
                raise IndexError(index)
            return rows[0]
        if index.step in (None, 1) and index.start is not None and index.stop is not None:
            start, stop = index.start, index.stop
            fetched = self._fetched.get(start)
            if fetched is not None and fetched[0] >= stop:
                return fetched[1][: stop - start]
        start, stop, step = index.indices(len(self))
        rows = self.fetch(start, stop)
        return rows[::step] if step != 1 else rows

    def _row(self, case_id, name: str, position: int, cols: list, statuses: list) -> dict:
        cells: list[str | None] = [None] * len(self.runs)
        for col, status in zip(cols, statuses, strict=True):
            cells[col - 1] = status  # the last result of a case in a run wins
        return {
            "key": case_key(case_id, name),
            "case_name": name,
            "position": position,
            "statuses": cells,
            "differs": len(set(cells)) > 1,
        }


def paginate(rows: SideBySide, number, per_page: int) -> Page:
    """Paginator(rows, per_page).get_page(number), in one query when the page exists: the
    page asked for is fetched first, and its window total answers the Paginator's count."""
    try:
        wanted = max(1, int(number))
    except (TypeError, ValueError):
        wanted = 1
    rows.fetch((wanted - 1) * per_page, wanted * per_page)
    return Paginator(rows, per_page).get_page(number)


def side_by_side(runs: list[TestRun], *, differences_only: bool = False) -> SideBySide:
    """The rows of `runs` side by side, all or only those that differ, to be paged (see
    SideBySide and `paginate`); fill in a page's `cells` with `fill_cells`."""
    return SideBySide(runs, differences_only=differences_only)


# What the comparison page shows of a result; the rest (prompt, assertions) stays unread.
_CELL_DEFERRED = ("prompt", "variables", "assertions", "assertion_results", "repeat_results")


def fill_cells(runs: list[TestRun], rows: list[dict]) -> None:
    """Load the results behind one page of side_by_side() rows, in one query."""
    keys = {row["key"] for row in rows}
    case_ids = [int(k[1:]) for k in keys if k.startswith("c")]
    names = [k[2:] for k in keys if k.startswith("n:")]
    by_key: dict[tuple[int, str], TestResult] = {}
    if runs and keys:
        results = (
            TestResult.objects.filter(run__in=[run.pk for run in runs])
            .filter(Q(case_id__in=case_ids) | Q(case_id=None, case_name__in=names))
            .defer(*_CELL_DEFERRED)
            .order_by("run", "position")
        )
        for result in results:  # in position order: the last result of a case wins
            by_key[(result.run_id, case_key(result.case_id, result.case_name))] = result
    for row in rows:
        row["cells"] = [by_key.get((run.pk, row["key"])) for run in runs]
