"""What ran over time: the history page's filters, each card's trend (pass rate and p95
latency per run) and one run's statistics for its report. Pass rates come from
`reporting.statistics`, the one definition.

A finished run's figures are read from its row: the counts the engine keeps while it runs and
the aggregates stored when it finished (`engine.run_aggregates`), so a report or a trend costs
the same with 10 results or 10,000. Only a run still going is computed from its results.
"""

from __future__ import annotations

from django.db import connection
from django.db.models import (
    Aggregate,
    Case,
    F,
    FloatField,
    OuterRef,
    QuerySet,
    Subquery,
    When,
    Window,
)
from django.db.models.functions import RowNumber

from testruns.engine.run_aggregates import store_run_aggregates
from testruns.live.snapshots import COMPLETED_RUNS
from testruns.models import TestResult, TestRun
from testruns.reporting.statistics import pass_rate


class Percentile(Aggregate):
    """PostgreSQL's percentile_cont(fraction) WITHIN GROUP (ORDER BY expression)."""

    function = "percentile_cont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression, fraction: float, **extra):
        super().__init__(expression, fraction=float(fraction), **extra)


def latency_percentile(fraction: float) -> Subquery:
    """A subquery for a run's latency percentile over its finished cases."""
    return Subquery(
        TestResult.objects.filter(run=OuterRef("pk"), latency_ms__isnull=False)
        .values("run")
        .annotate(p=Percentile("latency_ms", fraction))
        .values("p"),
        output_field=FloatField(),
    )


def stored_p95() -> Case:
    """A run's p95 latency: the stored one, else (a run whose aggregates are not stored yet)
    computed from its results. PostgreSQL evaluates the subquery only for such runs."""
    return Case(
        When(aggregated_at__isnull=False, then=F("latency_p95_ms")),
        default=latency_percentile(0.95),
        output_field=FloatField(),
    )


def filter_runs(
    runs: QuerySet[TestRun],
    *,
    card=None,
    provider=None,
    status=None,
    launcher=None,
    since=None,
    until=None,
) -> QuerySet[TestRun]:
    """`runs` narrowed by whichever filters are given (dates against the queue date)."""
    if card:
        runs = runs.filter(card=card)
    if provider:
        runs = runs.filter(provider=provider)
    if status:
        runs = runs.filter(status=status)
    if launcher:
        runs = runs.filter(launched_by=launcher)
    if since:
        runs = runs.filter(queued_at__date__gte=since)
    if until:
        runs = runs.filter(queued_at__date__lte=until)
    return runs


def card_trends(
    runs: QuerySet[TestRun], card_ids: list[int], *, points: int = 30
) -> dict[int, list[dict]]:
    """Per card, its latest `points` completed runs among `runs`, oldest first, with pass
    rate and p95 latency: what the history page draws."""
    latest = (
        runs.filter(card_id__in=card_ids, status__in=COMPLETED_RUNS, finished_at__isnull=False)
        .annotate(
            nth=Window(RowNumber(), partition_by=[F("card_id")], order_by=F("finished_at").desc()),
            p95=stored_p95(),
        )
        .filter(nth__lte=points)
        .order_by("card_id", "finished_at")
        .values(
            "pk", "card_id", "finished_at", "passed_count", "failed_count", "error_count", "p95"
        )
    )
    trends: dict[int, list[dict]] = {card_id: [] for card_id in card_ids}
    for row in latest:
        trends[row["card_id"]].append(
            {
                "run_id": row["pk"],
                "finished_at": row["finished_at"],
                "p95": row["p95"],
                "pass_rate": pass_rate(
                    row["passed_count"], row["failed_count"], row["error_count"]
                ),
            }
        )
    return trends


def run_statistics(run: TestRun) -> dict:
    """Pass rate (over evaluated cases: skipped ones do not count), latency percentiles,
    tokens, cost, cost per passing case and queue wait. A finished run's come from its row
    (its aggregates stored on the first view if they were not yet); a running run's from its
    results."""
    finished = run.is_finished and run.finished_at is not None
    if finished and (run.aggregated_at is not None or _store_aggregates(run)):
        return _finished_statistics(run)
    return _live_statistics(run)


def _store_aggregates(run: TestRun) -> bool:
    """Store a finished run's aggregates (it finished before they were stored at finish, or
    was cancelled) and put them on `run`; False when they could not be stored."""
    stored = store_run_aggregates(run.pk)
    if stored is None:
        return False
    for name, value in stored.items():
        setattr(run, name, value)
    return True


def _statistics(passed, failed, errors, skipped, p50, p95, tokens_in, tokens_out, cost) -> dict:
    return {
        "passed": passed,
        "evaluated": passed + failed + errors,
        "skipped": skipped,
        "pass_rate": pass_rate(passed, failed, errors),
        "p50_ms": p50,
        "p95_ms": p95,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cost": cost,
        "cost_per_pass": cost / passed if passed else None,
    }


def _finished_statistics(run: TestRun) -> dict:
    waited_until = run.started_at or run.finished_at
    return _statistics(
        run.passed_count,
        run.failed_count,
        run.error_count,
        run.skipped_count,
        run.latency_p50_ms,
        run.latency_p95_ms,
        run.tokens_in,
        run.tokens_out,
        run.cost,
    ) | {
        "queue_wait_seconds": (waited_until - run.queued_at).total_seconds(),
        "duration_seconds": (
            (run.finished_at - run.started_at).total_seconds() if run.started_at else None
        ),
    }


def _live_statistics(run: TestRun) -> dict:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FILTER (WHERE status = %s), "
            "count(*) FILTER (WHERE status = %s), "
            "count(*) FILTER (WHERE status = %s), "
            "count(*) FILTER (WHERE status = %s), "
            "percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms), "
            "percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms), "
            "COALESCE(sum(tokens_in), 0), COALESCE(sum(tokens_out), 0), "
            "COALESCE(sum(cost), 0) FROM testruns_testresult WHERE run_id = %s",
            [
                TestResult.Status.PASSED,
                TestResult.Status.FAILED,
                TestResult.Status.ERROR,
                TestResult.Status.SKIPPED,
                run.pk,
            ],
        )
        figures = cursor.fetchone()
        cursor.execute(
            "SELECT extract(epoch FROM COALESCE(started_at, finished_at, now()) "
            "- queued_at)::float8, extract(epoch FROM finished_at - started_at)"
            "::float8 FROM testruns_testrun WHERE id = %s",
            [run.pk],
        )
        queue_wait, duration = cursor.fetchone()
    return _statistics(*figures) | {
        "queue_wait_seconds": queue_wait,
        "duration_seconds": duration,
    }
