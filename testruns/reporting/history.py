"""What ran over time: the history page's filters, each card's trend (pass rate and p95
latency per run) and one run's statistics for its report. Pass rates come from
`reporting.statistics`, the one definition.
"""

from __future__ import annotations

from django.db import connection
from django.db.models import Aggregate, F, FloatField, OuterRef, QuerySet, Subquery, Window
from django.db.models.functions import RowNumber

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
            p95=latency_percentile(0.95),
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
    tokens, cost, cost per passing case and queue wait."""
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
        passed, failed, errors, skipped, p50, p95, tokens_in, tokens_out, cost = cursor.fetchone()
        cursor.execute(
            "SELECT extract(epoch FROM COALESCE(started_at, finished_at, now()) "
            "- queued_at)::float8, extract(epoch FROM finished_at - started_at)"
            "::float8 FROM testruns_testrun WHERE id = %s",
            [run.pk],
        )
        queue_wait, duration = cursor.fetchone()
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
        "queue_wait_seconds": queue_wait,
        "duration_seconds": duration,
    }
