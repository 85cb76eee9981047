"""Runs side by side: cases as rows, runs as columns, for the comparison page. Rows line up by
`baselines.case_key`. PostgreSQL lines them up and pages them, so a page of rows costs two
queries (the rows with their total, then their detail) whether the runs hold 10 cases or
10,000. Each cell is compared with the row's first (its reference): a word diff of the
output, the assertion outcomes that changed, latency and cost deltas; and the prompts of the
versions compared, against the first run's.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from django.core.paginator import Page, Paginator
from django.db import connection
from django.db.models import Q
from django.utils.html import escape

from testruns.models import TestResult, TestRun
from testruns.reporting.baselines import case_key
from testruns.reporting.text_diff import line_diff, word_diff

# A cell shows this much of an output (the report shows all of it), diffed as shown.
SHOWN_CHARS = 4_000

# The runs' results lined up as case_key() lines them up (by case id, by name once the case
# is gone), each with its run's column (1-based). A row takes its name and position from the
# first column holding the case; a cell holds the status of the case's last result in that
# run. A row differs when some run lacks the case, or its verdicts, its outputs (or errors)
# or its assertion outcomes are not all the same, all told in PostgreSQL: the outputs (with
# the errors) compared byte for byte (COLLATE "C": no locale rules to apply), the outcomes by
# the 64-bit hash of their jsonb (md5 of either made this query half as slow again at 10,000
# cases). The total comes with the page (a window over the rows shown), so a page is one
# query.
_PAGE_SQL = """
WITH keyed AS (
    SELECT r.case_id, CASE WHEN r.case_id IS NULL THEN r.case_name END AS orphan,
           r.case_name, r.position, r.status,
           (r.error || E'\\n' || r.output) COLLATE "C" AS said,
           jsonb_hash_extended(r.assertion_results, 0) AS outcomes,
           array_position(%(runs)s::bigint[], r.run_id) AS col
    FROM testruns_testresult r WHERE r.run_id = ANY(%(runs)s::bigint[])
), grouped AS (
    SELECT case_id, orphan,
           (array_agg(case_name ORDER BY col, position))[1] AS case_name,
           (array_agg(position ORDER BY col, position))[1] AS position,
           array_agg(col ORDER BY col, position) AS cols,
           array_agg(status ORDER BY col, position) AS statuses,
           count(DISTINCT col) AS present,
           min(status) <> max(status) AS mixed,
           min(said) <> max(said) AS outputs_differ,
           min(outcomes) <> max(outcomes) AS outcomes_differ
    FROM keyed GROUP BY case_id, orphan
), shown AS (
    SELECT * FROM grouped
    WHERE NOT %(differences_only)s OR present < %(columns)s OR mixed OR outputs_differ
          OR outcomes_differ
)
SELECT case_id, case_name, position, cols, statuses, present < %(columns)s, mixed,
       outputs_differ, outcomes_differ, count(*) OVER () FROM shown
ORDER BY position, case_name COLLATE "C", case_id, orphan
LIMIT %(limit)s OFFSET %(offset)s
"""


class SideBySide(Sequence):
    """Cases as rows, runs as columns, in case order: each row {"key", "case_name",
    "position", "statuses": [status|None per run], "differs", "what": the kinds of
    difference ("missing", "verdict", "output", "assertions")}. Lazy: a slice (a Paginator's
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

    def _row(
        self, case_id, name: str, position: int, cols: list, statuses: list, *differences: bool
    ) -> dict:
        cells: list[str | None] = [None] * len(self.runs)
        for col, status in zip(cols, statuses, strict=True):
            cells[col - 1] = status  # the last result of a case in a run wins
        what = [kind for kind, differs in zip(_KINDS, differences, strict=True) if differs]
        return {
            "key": case_key(case_id, name),
            "case_name": name,
            "position": position,
            "statuses": cells,
            "differs": bool(what),
            "what": what,
        }


# The flags _PAGE_SQL returns after the statuses, in its order.
_KINDS = ("missing", "verdict", "output", "assertions")


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
_CELL_DEFERRED = ("prompt", "variables", "assertions", "repeat_results")


def fill_cells(runs: list[TestRun], rows: list[dict]) -> None:
    """Load the results behind one page of side_by_side() rows, in one query, as each row's
    `cells` (a result or None per run) and `columns` (each cell compared with the row's
    reference, see compare_cells)."""
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
        row["columns"] = compare_cells(row["cells"])


def _said(result: TestResult) -> str:
    return result.error or result.output


def _outcomes(result: TestResult, reference: TestResult | None) -> list[dict]:
    """The result's assertion outcomes, each marked `changed` when the reference's outcome
    in the same place differs in type, verdict, error or reason."""
    theirs = reference.assertion_results if reference is not None else []
    theirs = theirs if isinstance(theirs, list) else []
    shown = []
    for i, outcome in enumerate(result.assertion_results or []):
        if not isinstance(outcome, dict):
            continue
        other = theirs[i] if i < len(theirs) and isinstance(theirs[i], dict) else {}
        keys = ("type", "passed", "error", "reason")
        changed = reference is not None and any(outcome.get(k) != other.get(k) for k in keys)
        shown.append({**outcome, "changed": changed})
    return shown


def _trend(shown_delta: float | Decimal) -> str:
    """A delta as shown (rounded) is worse above zero (slower, dearer), better below."""
    return "worse" if shown_delta > 0 else "better" if shown_delta < 0 else ""


def _latency_delta(result: TestResult, reference: TestResult) -> dict:
    if result.latency_ms is None or reference.latency_ms is None:
        return {}
    delta = result.latency_ms - reference.latency_ms
    label = f"{delta:+,.0f} ms" if round(delta) else "±0 ms"
    return {"latency_delta": delta, "latency_label": label, "latency_trend": _trend(round(delta))}


def _cost_delta(result: TestResult, reference: TestResult) -> dict:
    delta = Decimal(result.cost) - Decimal(reference.cost)
    label = f"{'+' if delta > 0 else '−'}${abs(delta):.6f}" if delta else "±$0"
    return {"cost_delta": delta, "cost_label": label, "cost_trend": _trend(delta)}


def compare_cells(cells: list[TestResult | None]) -> list[dict | None]:
    """Each result of a row against the row's reference (its first result): {"result",
    "reference" (is it the reference), "text" (safe HTML: the output, or the error, as a
    word diff against the reference's; only the first SHOWN_CHARS), "changed",
    "truncated", "outcomes", "latency_delta" and "cost_delta" with their labels and trends
    ("worse", "better" or "")}."""
    reference = next((cell for cell in cells if cell is not None), None)
    columns: list[dict | None] = []
    for cell in cells:
        if cell is None:
            columns.append(None)
            continue
        said = _said(cell)
        column = {
            "result": cell,
            "reference": cell is reference,
            "truncated": len(said) > SHOWN_CHARS,
            "outcomes": _outcomes(cell, None if cell is reference else reference),
            "latency_delta": None,
            "latency_label": "",
            "latency_trend": "",
            "cost_delta": None,
            "cost_label": "",
            "cost_trend": "",
        }
        if cell is reference:
            column.update(text=escape(said[:SHOWN_CHARS]), changed=False)
        else:
            diff = word_diff(_said(reference)[:SHOWN_CHARS], said[:SHOWN_CHARS])
            column.update(text=diff.html, changed=diff.changed)
            column.update(_latency_delta(cell, reference) | _cost_delta(cell, reference))
        columns.append(column)
    return columns


def prompt_changes(runs: list[TestRun]) -> list[dict]:
    """The prompt of each other version among `runs` against the first run's version, in
    column order, once per version: {"base_run", "run" (the first run of that version),
    "base", "version" (PromptVersion), "system_prompt", "template" (text_diff.Diff)}. Empty
    when every run ran the same version. The runs come with their card and version
    (reporting.access selects them): this reads nothing more."""
    if not runs:
        return []
    base = runs[0].version
    seen, changes = {base.pk}, []
    for run in runs[1:]:
        version = run.version
        if version.pk in seen:
            continue
        seen.add(version.pk)
        changes.append(
            {
                "base_run": runs[0],
                "run": run,
                "base": base,
                "version": version,
                "system_prompt": line_diff(base.system_prompt, version.system_prompt),
                "template": line_diff(base.template, version.template),
            }
        )
    return changes
