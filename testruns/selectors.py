"""Reads with access rules or non-trivial queries. Authorization for runs lives here once."""

from __future__ import annotations

from django.db import connection
from django.db.models import QuerySet

from testruns import events
from testruns.models import TestRun


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


def run_snapshot(run: TestRun, *, result_limit: int = events.EVENT_RESULT_LIMIT) -> dict:
    """Everything a run page shows, with the sequence number it is current as of. Read the
    run before its results: a result announced after `seq` may also be in the list, and the
    page de-duplicates rows by id."""
    state = TestRun.objects.values(
        "event_seq", "status", "phase", "total_cases", "done_count", "passed_count",
        "failed_count", "error_count", "priority", "queued_at").get(pk=run.pk)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {events.result_columns()} FROM testruns_testresult "
            "WHERE run_id = %s AND status = ANY(%s) ORDER BY position LIMIT %s",
            [run.pk, list(events.DONE), result_limit])
        results = [dict(zip(events.RESULT_ROW, row, strict=True)) for row in cursor.fetchall()]
    run.status, run.priority, run.queued_at = state["status"], state["priority"], state["queued_at"]
    return {
        "type": "snapshot",
        "seq": state.pop("event_seq"),
        "run": {"id": run.pk, **{k: v for k, v in state.items()
                                 if k not in ("priority", "queued_at")},
                "queue_position": queue_position(run)},
        "results": results,
    }
