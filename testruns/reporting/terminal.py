"""Runs as text for a terminal or a CI log (`manage.py run_card`): a summary line, a bar of
progress, and a short table of the failing cases with their first reason."""

from __future__ import annotations

import re
import shutil

from django.conf import settings
from django.urls import reverse

from testruns.models import TestResult, TestRun
from testruns.reporting import formats
from testruns.reporting.baselines import baseline_among
from testruns.reporting.statistics import pass_rate
from testruns.reporting.verdicts import RunVerdict, run_verdict

BAR_WIDTH = 20
# The failing-cases table: enough rows to see a pattern, a line each, the rest in the report.
MAX_FAILING_ROWS = 20
MAX_NAME_CHARS = 40
TABLE_WIDTH = 100  # when stdout is no terminal (a CI log) and COLUMNS is not set


def summary_line(run: TestRun) -> str:
    evaluated = run.passed_count + run.failed_count + run.error_count
    fraction = pass_rate(run.passed_count, run.failed_count, run.error_count)
    rate = f"{100 * fraction:.0f}%" if fraction is not None else "n/a"
    return (
        f"run #{run.pk} {run.card.slug} on {run.provider.name}: {run.status}, "
        f"{run.passed_count} passed, {run.failed_count} failed, {run.error_count} error, "
        f"{run.total_cases - evaluated} not evaluated (pass rate {rate})"
    )


def live_url(run: TestRun) -> str:
    """The run's live page: where to watch it while it waits and runs."""
    return f"{settings.SITE_URL}{run.get_absolute_url()}"


def report_url(run: TestRun) -> str:
    """The run's report page (the live page is where it was watched; after the run, the
    report is what a CI log's reader wants)."""
    return f"{settings.SITE_URL}{reverse('report', args=[run.pk])}"


def table_width() -> int:
    return max(60, shutil.get_terminal_size((TABLE_WIDTH, 24)).columns)


def clip(text: str, width: int) -> str:
    """One line of at most `width` characters: an error's traceback or a long reason must not
    turn the table into a wall of text."""
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= width else text[: max(0, width - 3)] + "..."


def first_reason(result: TestResult) -> str:
    """Why the case did not pass: the error, or its first failed assertion (of the first
    repeat that failed: execution shows that repeat's outcomes on the result)."""
    if result.status == TestResult.Status.ERROR:
        return result.error or "error"
    return (formats.failed_assertions(result) or ["the case did not pass"])[0]


def failing_cases_table(run: TestRun, *, width: int) -> list[str]:
    """The run's failed and errored cases, in case order: name, status and first reason,
    each row cut to `width`; at most MAX_FAILING_ROWS of them (the report has the rest)."""
    failing = run.results.filter(status__in=[TestResult.Status.FAILED, TestResult.Status.ERROR])
    rows = list(
        failing.order_by("position").only("case_name", "status", "assertion_results", "error")[
            :MAX_FAILING_ROWS
        ]
    )
    if not rows:
        return []
    names = [clip(row.case_name, MAX_NAME_CHARS) for row in rows]
    name_width = max(len("case"), *map(len, names))
    status_width = max(len("status"), *(len(row.status) for row in rows))
    reason_width = max(20, width - 2 - name_width - 2 - status_width - 2)
    lines = [f"  {'case':<{name_width}}  {'status':<{status_width}}  reason"]
    lines += [
        f"  {name:<{name_width}}  {row.status:<{status_width}}  "
        f"{clip(first_reason(row), reason_width)}"
        for name, row in zip(names, rows, strict=True)
    ]
    if len(rows) == MAX_FAILING_ROWS and (more := failing.count() - len(rows)) > 0:
        lines.append(f"  ... and {more} more failing case(s): see the report")
    return lines


def progress_text(run: TestRun, position: int | None) -> str:
    """ "#3 in queue" while waiting, a bar with counts once running or done."""
    if run.status == TestRun.Status.QUEUED:
        return f"run #{run.pk}: #{position or '?'} in queue"
    filled = BAR_WIDTH * run.progress_percent // 100
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    # With repeats the bar moves with each model call; the counts stay in cases.
    calls = (
        f" ({min(run.calls_done, run.calls_total)}/{run.calls_total} calls)"
        if run.calls_total > run.total_cases
        else ""
    )
    return (
        f"run #{run.pk} [{bar}] {run.done_count}/{run.total_cases} done{calls}, "
        f"{run.passed_count} passed, {run.failed_count} failed, {run.error_count} error"
    )


def regressions(run: TestRun) -> tuple[bool, list[str]]:
    """Whether the run regressed against its baseline beyond what chance explains
    (reporting.verdicts), and a line per case that did. A run without a baseline (its
    card's first) cannot regress. An operator's command sees every run."""
    baseline = baseline_among(TestRun.objects.all(), run)
    if baseline is None or not run.is_finished:
        return False, []
    verdict = run_verdict(baseline, run)
    lines = [
        f"  run #{run.pk} regressed on {case.case_name}: {case.before[0]}/{case.before[1]} "
        f"-> {case.after[0]}/{case.after[1]} passed (p = {case.p_value:.4f})"
        for case in verdict.regressions
    ]
    return verdict.verdict == RunVerdict.REGRESSION, lines
