"""A finished run's aggregates over its results (latency p50 and p95, skipped cases), stored
on the run once, so that its report and the history's trends read a few columns instead of
scanning up to 10,000 results on every view.

Written when recording.finish_run has closed the run, after its transaction (the run slot is
handed on without waiting for the scan). Here rather than in `reporting`, which sits above the
engine and may not be imported by it; reporting calls `store_run_aggregates` too, for runs
that finished some other way (cancelled) or whose store failed. The results of a finished run
no longer change (a late answer to a cancelled case is thrown away), so storing twice writes
the same values.
"""

from __future__ import annotations

import logging

from django.db import connection, transaction

from testruns.models import TestRun

log = logging.getLogger(__name__)

AGGREGATE_FIELDS = ("latency_p50_ms", "latency_p95_ms", "skipped_count", "aggregated_at")

# percentile_cont ignores results without a latency (never run); with no row at all the
# aggregate still yields one row (nulls and 0), so a run without results is stored too.
_STORE_SQL = """
UPDATE testruns_testrun AS run SET
    latency_p50_ms = agg.p50, latency_p95_ms = agg.p95, skipped_count = agg.skipped,
    aggregated_at = now()
FROM (
    SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95,
           count(*) FILTER (WHERE status = 'skipped') AS skipped
    FROM testruns_testresult WHERE run_id = %(run)s
) AS agg
WHERE run.id = %(run)s AND run.status = ANY(%(finished)s)
RETURNING run.latency_p50_ms, run.latency_p95_ms, run.skipped_count, run.aggregated_at
"""


def store_run_aggregates(run_id: int) -> dict | None:
    """Compute and store the aggregates of a finished run in one statement; returns them by
    field name, or None when the run is not finished (nothing is stored for a running one)
    or the statement failed. Never raises an Exception: a run without stored aggregates is
    only slower to report (its report stores them on first view)."""
    try:
        # A savepoint, so that a failure inside a caller's transaction spoils only this.
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(_STORE_SQL, {"run": run_id, "finished": list(TestRun.FINISHED)})
            row = cursor.fetchone()
    except Exception:
        log.warning("the aggregates of run %s could not be stored", run_id, exc_info=True)
        return None
    return dict(zip(AGGREGATE_FIELDS, row, strict=True)) if row else None
