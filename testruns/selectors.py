"""Reads with access rules or non-trivial queries. Authorization for runs lives here once."""

from __future__ import annotations

from django.db.models import QuerySet

from testruns.models import TestResult, TestRun


def runs_visible_to(user) -> QuerySet[TestRun]:
    runs = TestRun.objects.select_related("card", "provider", "version", "launched_by")
    if not user.is_authenticated:
        return runs.none()
    if user.has_perm("testruns.view_testrun"):
        return runs
    return runs.filter(launched_by=user)


def get_run_for_user(user, pk) -> TestRun | None:
    try:
        return runs_visible_to(user).get(pk=pk)
    except (TestRun.DoesNotExist, ValueError, TypeError):
        return None


def queue_position(run: TestRun) -> int | None:
    """1-based place among waiting runs (priority first, then queue time)."""
    if run.status != TestRun.Status.QUEUED:
        return None
    ahead = TestRun.objects.filter(status=TestRun.Status.QUEUED).filter(
        priority__gt=run.priority
    ).count() + TestRun.objects.filter(
        status=TestRun.Status.QUEUED, priority=run.priority, queued_at__lt=run.queued_at
    ).count()
    return ahead + 1


def result_row(result: TestResult) -> dict:
    return {
        "id": result.pk, "position": result.position, "case_name": result.case_name,
        "status": result.status, "output": result.output, "error": result.error,
        "latency_ms": result.latency_ms,
    }


def run_snapshot(run: TestRun, *, result_limit: int = 100) -> dict:
    """Everything a run page shows, with the sequence number it is current as of."""
    run.refresh_from_db()
    finished = run.results.exclude(status__in=[TestResult.Status.PENDING,
                                               TestResult.Status.RUNNING])
    return {
        "type": "snapshot",
        "seq": run.event_seq,
        "run": {
            "id": run.pk, "status": run.status, "phase": run.phase,
            "total_cases": run.total_cases, "done_count": run.done_count,
            "passed_count": run.passed_count, "failed_count": run.failed_count,
            "error_count": run.error_count, "queue_position": queue_position(run),
        },
        "results": [result_row(r) for r in finished.order_by("position")[:result_limit]],
    }
