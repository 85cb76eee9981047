"""Read-only figures about the queue, the workers and this host, for the API, /healthz and the
dashboard. Everything comes from PostgreSQL (times by its clock), so every web process
reports the same numbers.

Windowed figures (waits, throughput, error rate) cover runs and cases that finished or
started within the last `window_seconds`. Results are reached through the runs that were
active in the window (TestRun is far smaller than TestResult, and results are indexed by
run), so the cost follows recent activity, not the size of history.
"""

from __future__ import annotations

from django.conf import settings
from django.db import connection
from django.db.models.expressions import RawSQL

from testruns.engine import gate
from testruns.live.snapshots import slot_usage
from testruns.models import TestRun, WorkerHeartbeat
from testruns.ops import host_load

# A worker writes its heartbeat every LEASE_TTL_SECONDS / 3. It counts as live while its
# latest one is younger than three missed beats (LEASE_TTL_SECONDS) plus this slack, which
# covers a slow tick on a busy host without calling a working worker dead.
LIVE_SLACK_SECONDS = 10.0
DEFAULT_WINDOW_SECONDS = 3600
MAX_WINDOW_SECONDS = 30 * 24 * 3600


def live_after_seconds() -> float:
    return float(settings.LEASE_TTL_SECONDS) + LIVE_SLACK_SECONDS


# --- Workers --------------------------------------------------------------------------------


def workers() -> list[dict]:
    """Every worker heartbeat row with its age by the database clock and whether it is live.
    Rows of workers that died without a clean shutdown stay (not live) until one restarts
    under the same holder id or an operator deletes them."""
    rows = WorkerHeartbeat.objects.annotate(
        age=RawSQL("extract(epoch FROM now() - last_seen)::float8", [])
    ).order_by("hostname", "pid")
    limit = live_after_seconds()
    return [
        {
            "holder": row.holder,
            "hostname": row.hostname,
            "pid": row.pid,
            "started_at": row.started_at,
            "last_seen": row.last_seen,
            "seconds_since_heartbeat": round(max(row.age, 0.0), 3),
            "live": row.age < limit,
            "accepting": row.accepting,
            "note": row.note,
            "cpu_percent": row.cpu_percent,
            "memory_available_mb": round(row.memory_available_mb, 1),
            "load_average": row.load_average,
        }
        for row in rows
    ]


def live_worker_count() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM testruns_workerheartbeat WHERE last_seen > now() - "
            "make_interval(secs => %s)",
            [live_after_seconds()],
        )
        return cursor.fetchone()[0]


def system_resources() -> dict:
    """This host (the one answering), its admission thresholds, and every worker."""
    rows = workers()
    live = [row for row in rows if row["live"]]
    return {
        "host": host_load.host_snapshot().as_dict(),
        "limits": host_load.limits(),
        "host_pressure": host_load.host_pressure(),
        "workers": rows,
        "live_workers": len(live),
        "accepting_workers": sum(row["accepting"] for row in live),
        "live_after_seconds": live_after_seconds(),
    }


# --- Queue ----------------------------------------------------------------------------------

_QUEUE_SQL = """
WITH window_runs AS (
    SELECT status, queued_at, started_at, finished_at FROM testruns_testrun
    WHERE started_at >= now() - make_interval(secs => %(window)s)
       OR finished_at >= now() - make_interval(secs => %(window)s)
), waits AS (
    SELECT extract(epoch FROM started_at - queued_at)::float8 AS wait FROM window_runs
    WHERE started_at >= now() - make_interval(secs => %(window)s)
)
SELECT
    (SELECT count(*) FROM testruns_testrun WHERE status = 'queued'),
    (SELECT count(*) FROM testruns_testrun WHERE status = 'running'),
    (SELECT avg(wait) FROM waits),
    (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY wait) FROM waits),
    (SELECT count(*) FROM waits),
    (SELECT count(*) FROM window_runs
     WHERE finished_at >= now() - make_interval(secs => %(window)s)
       AND status = ANY(%(finished)s)),
    (SELECT count(*) FROM window_runs
     WHERE finished_at >= now() - make_interval(secs => %(window)s) AND status = 'error')
"""

_CASES_SQL = """
SELECT count(*),
       count(*) FILTER (WHERE t.status = 'error'),
       count(*) FILTER (WHERE t.status IN ('passed', 'failed', 'error'))
FROM testruns_testresult t
WHERE t.run_id IN (SELECT id FROM testruns_testrun WHERE status = 'running'
                   OR finished_at >= now() - make_interval(secs => %(window)s))
  AND t.finished_at >= now() - make_interval(secs => %(window)s)
  AND t.status IN ('passed', 'failed', 'error', 'skipped')
"""


def queue_stats(window_seconds: int = DEFAULT_WINDOW_SECONDS) -> dict:
    """Waiting and running runs now, the limits, and over the window: mean and p95 queue
    wait, throughput and error rates."""
    params = {"window": window_seconds, "finished": list(TestRun.FINISHED)}
    with connection.cursor() as cursor:
        cursor.execute(_QUEUE_SQL, params)
        waiting, running, mean_wait, p95_wait, started, finished, errored = cursor.fetchone()
        cursor.execute(_CASES_SQL, params)
        cases_done, case_errors, cases_evaluated = cursor.fetchone()
    hours = window_seconds / 3600
    stats = {
        "waiting": waiting,
        "running": running,
        "limits": limits(),
        "window_seconds": window_seconds,
        "runs_started": started,
        "mean_wait_seconds": mean_wait,
        "p95_wait_seconds": p95_wait,
        "runs_finished": finished,
        "throughput_runs_per_hour": finished / hours,
        "cases_finished": cases_done,
        "throughput_cases_per_minute": cases_done / (window_seconds / 60),
        "run_error_rate": errored / finished if finished else None,
        "case_error_rate": case_errors / cases_evaluated if cases_evaluated else None,
    }
    stats["waiting_reasons"] = waiting_reasons(stats)
    return stats


def limits() -> dict:
    """Run slots, every provider's call slots, the queue's maximum length and the per-user
    limit (0 when off)."""
    slots = slot_usage()
    runs = next((slot for slot in slots if slot["name"] == gate.RUNS), None)
    per_user = next((slot for slot in _semaphores([gate.RUNS_PER_USER])), None)
    return {
        "max_concurrent_runs": runs["limit"] if runs else settings.MAX_CONCURRENT_RUNS,
        "runs_in_use": runs["in_use"] if runs else 0,
        "max_runs_per_user": per_user["limit"] if per_user else settings.MAX_RUNS_PER_USER,
        "max_queue_length": settings.MAX_QUEUE_LENGTH or None,
        "slots": slots,
    }


def _semaphores(names: list[str]) -> list[dict]:
    with connection.cursor() as cursor:
        cursor.execute(
            'SELECT name, "limit", in_use FROM testruns_semaphore WHERE name = ANY(%s)', [names]
        )
        return [{"name": n, "limit": limit, "in_use": used} for n, limit, used in cursor]


def worker_reasons() -> list[str]:
    """Why no case would move now: no live worker, or every live one holding back because
    its host is too busy (resource-aware admission)."""
    rows = [row for row in workers() if row["live"]]
    if not rows:
        return ["no worker is running"]
    if not any(row["accepting"] for row in rows):
        notes = sorted({row["note"] for row in rows if row["note"]})
        return [
            "every worker is too busy to take new cases"
            + (f": {'; '.join(notes)}" if notes else "")
        ]
    return []


def waiting_reasons(stats: dict) -> list[str]:
    """Why runs wait, for people: full run slots, and the workers' state."""
    reasons = []
    slots = stats["limits"]
    if stats["waiting"] and slots["runs_in_use"] >= slots["max_concurrent_runs"]:
        reasons.append(f"all {slots['max_concurrent_runs']} run slots are in use")
    if stats["waiting"] or stats["running"]:
        reasons += worker_reasons()
    return reasons


def run_waiting_reasons(snapshot: dict) -> list[str]:
    """Why one run (a snapshots.run_snapshot) is not moving: runs ahead of it and full run
    slots while it waits, and the workers' state while it has cases to do."""
    run, queue = snapshot["run"], snapshot["queue"]
    reasons = []
    if run["status"] == TestRun.Status.QUEUED and queue:
        ahead = (queue["position"] or 1) - 1
        if ahead:
            reasons.append(f"{ahead} run{'s' if ahead != 1 else ''} ahead in the queue")
        in_use, limit = queue["slots"]
        if in_use >= limit:
            reasons.append(f"all {limit} run slots are in use")
    if run["status"] in (TestRun.Status.QUEUED, TestRun.Status.RUNNING):
        reasons += worker_reasons()
    return reasons
