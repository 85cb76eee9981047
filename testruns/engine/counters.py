"""The monotonic counters and cumulative histograms behind /metrics, kept in PostgreSQL
(MetricCounter: one row per series), so they are right across any number of processes and
hosts, survive restarts and never go down when runs are deleted.

They are added to where things end, never on a case's hot path: a finished run's runs, cases,
provider errors, retries, cache hits and case latencies when it is settled
(engine.settling), a run's queue wait once it has started (a sweep step), a notification's
outcome when its attempt is recorded, a schedule's launch in its tick. Every addition is one
INSERT ... ON CONFLICT DO UPDATE in the caller's transaction, its rows in one fixed order (by
name, then labels) so that two transactions adding to the same series cannot deadlock.
"""

from __future__ import annotations

import json

from django.db import connection, transaction

QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
CASE_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)

# name -> (help, label names). /metrics shows each as pcr_<name>_total.
COUNTERS = {
    "runs": ("Runs that finished, by final status.", ("status",)),
    "cases": ("Cases of finished runs, by provider and status.", ("provider", "status")),
    "provider_errors": (
        "Cases of finished runs that ended in an error, by provider and kind.",
        ("provider", "kind"),
    ),
    "case_retries": (
        "Provider calls made again after a failure (429, 5xx, timeouts) by cases of finished runs.",
        ("provider",),
    ),
    "cache_hits": ("Cases of finished runs answered from the response cache.", ("provider",)),
    "notifications_sent": ("Notifications delivered.", ("channel",)),
    "notifications_failed": (
        "Notifications given up after their last attempt failed.",
        ("channel",),
    ),
    "notification_attempts_failed": (
        "Attempts at delivering a notification that failed (each retry counts).",
        ("channel",),
    ),
    "schedule_launches": (
        "Due times schedules launched (outcome launched) or could not launch (refused).",
        ("outcome",),
    ),
}
# name -> (help, label names besides le, buckets). /metrics shows pcr_<name>_bucket/_count/_sum.
HISTOGRAMS = {
    "queue_wait_seconds": (
        "Time runs waited for a run slot, counted when they started.",
        (),
        QUEUE_WAIT_BUCKETS,
    ),
    "case_latency_seconds": (
        "Provider latency of the cases of finished runs.",
        ("provider",),
        CASE_LATENCY_BUCKETS,
    ),
}

# Provider errors are stored as text; their kind is read from the words the providers write.
ERROR_KIND_SQL = """
CASE WHEN t.error ~ '^HTTP 429' THEN 'rate_limited'
     WHEN t.error ~ 'HTTP 5[0-9][0-9]' THEN 'server_error'
     WHEN t.error ~ '^HTTP 40[13]' THEN 'auth'
     WHEN t.error ~ '^HTTP 4[0-9][0-9]' THEN 'client_error'
     WHEN t.error ~* 'timed out' THEN 'timeout'
     WHEN t.error ~* '^connection failed' THEN 'connection'
     WHEN t.error ~ '^Template error' THEN 'template'
     WHEN t.error ~ '^(the vendor answered with something|the answer (was larger|has no|''s))'
       OR t.error ~ '^(a text block|the command''s answer was larger)' THEN 'bad_response'
     WHEN t.error ~ '^the vendor answered with an error' THEN 'server_error'
     WHEN t.error ~ '^the prompt cannot be sent' THEN 'client_error'
     WHEN t.error ~ '^unexpected error:' THEN 'unexpected'
     WHEN t.error ~ '^the worker''s time limit' THEN 'time_limit'
     WHEN t.error ~ '^the result could not be saved' THEN 'database'
     ELSE 'other' END
"""

# Adds the (name, labels, value) rows of `series` (a CTE the statement defines) to the counters.
_UPSERT = """
INSERT INTO testruns_metriccounter (name, labels, value)
SELECT name, labels, sum(value) FROM series WHERE value > 0
GROUP BY name, labels ORDER BY name, labels
ON CONFLICT (name, labels) DO UPDATE SET value = testruns_metriccounter.value + EXCLUDED.value
"""


def _bucket_rows(name: str, buckets: tuple, value: str, labels: str, source: str) -> str:
    """SELECTs giving a cumulative histogram's bucket, count and sum rows of `value` (seconds)
    over `source`; `labels` is a jsonb expression of its other labels."""
    bounds = ", ".join(f"('{float(b)!r}', {float(b)!r}::float8)" for b in buckets)
    bounds += ", ('+Inf', 'Infinity'::float8)"
    return f"""
    SELECT '{name}_bucket', {labels} || jsonb_build_object('le', b.le),
           count(*) FILTER (WHERE {value} <= b.bound)::float8
    FROM {source} CROSS JOIN (VALUES {bounds}) AS b(le, bound) GROUP BY 2
    UNION ALL SELECT '{name}_count', {labels}, count(*)::float8 FROM {source} GROUP BY 2
    UNION ALL SELECT '{name}_sum', {labels}, sum({value})::float8 FROM {source} GROUP BY 2
    """


_PROVIDER = "jsonb_build_object('provider', t.provider)"

_COUNT_FINISHED_RUNS = f"""
WITH runs AS (
    SELECT r.id, r.status, p.name AS provider FROM testruns_testrun r
    JOIN testruns_provider p ON p.id = r.provider_id WHERE r.id = ANY(%(runs)s)
), results AS (
    SELECT runs.provider, t.status, t.retries, t.cached, t.latency_ms, t.error
    FROM testruns_testresult t JOIN runs ON runs.id = t.run_id
), timed AS (SELECT * FROM results WHERE latency_ms IS NOT NULL),
series (name, labels, value) AS (
    SELECT 'runs', jsonb_build_object('status', status), count(*)::float8 FROM runs GROUP BY 2
    UNION ALL SELECT 'cases', {_PROVIDER} || jsonb_build_object('status', t.status),
           count(*)::float8 FROM results t GROUP BY 2
    UNION ALL SELECT 'case_retries', {_PROVIDER}, sum(t.retries)::float8 FROM results t GROUP BY 2
    UNION ALL SELECT 'cache_hits', {_PROVIDER}, (count(*) FILTER (WHERE t.cached))::float8
           FROM results t GROUP BY 2
    UNION ALL SELECT 'provider_errors', {_PROVIDER} || jsonb_build_object('kind', {ERROR_KIND_SQL}),
           count(*)::float8 FROM results t WHERE t.status = 'error' GROUP BY 2
    UNION ALL {
    _bucket_rows(
        "case_latency_seconds", CASE_LATENCY_BUCKETS, "t.latency_ms / 1000.0", _PROVIDER, "timed t"
    )
}
)
{_UPSERT}
"""

# Claims (at most 500) started runs whose wait is not counted yet and counts their waits, in
# one statement: rows another sweeper holds are skipped, so each run is counted once.
_COUNT_STARTED_RUNS = f"""
WITH started AS (
    UPDATE testruns_testrun r SET wait_counted = true
    FROM (SELECT id FROM testruns_testrun WHERE NOT wait_counted AND started_at IS NOT NULL
          ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED) AS claimed
    WHERE r.id = claimed.id
    RETURNING GREATEST(extract(epoch FROM r.started_at - r.queued_at), 0)::float8 AS wait
), series (name, labels, value) AS ({
    _bucket_rows("queue_wait_seconds", QUEUE_WAIT_BUCKETS, "s.wait", "'{}'::jsonb", "started s")
})
{_UPSERT}
"""


def add(name: str, labels: dict[str, str], amount: float = 1) -> None:
    """Add `amount` to one series, in the caller's transaction."""
    with connection.cursor() as cursor:
        cursor.execute(
            "WITH series (name, labels, value) AS (SELECT %s, %s::jsonb, %s::float8) " + _UPSERT,
            [name, json.dumps(labels, sort_keys=True), amount],
        )


def count_finished_runs(run_ids: list[int]) -> None:
    """Inside the transaction that settles these runs (so exactly once): their final statuses,
    their cases by status, errors by kind, retries, cache hits and latencies."""
    if run_ids:
        with connection.cursor() as cursor:
            cursor.execute(_COUNT_FINISHED_RUNS, {"runs": list(run_ids)})


def count_started_runs() -> int:
    """A sweep step: the queue waits of runs that started since the last one. Returns how
    many histogram rows were added to (0: no run started)."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_COUNT_STARTED_RUNS)
        return cursor.rowcount
