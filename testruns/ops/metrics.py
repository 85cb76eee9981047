"""/metrics in Prometheus' text format.

Every figure is computed at scrape time from PostgreSQL by one custom collector, so any
number of web and worker processes need no shared memory and every web process answers the
same: PostgreSQL is already the authority for runs, slots and results.

- Gauges of the present: runs waiting and running, slots in use and limits per semaphore,
  live and accepting workers; a counter of corrections the sweeper made to slot counts.
- Histograms and counts over a recent window (METRICS_WINDOW_SECONDS, default one hour): queue
  wait of runs that started in it, case latency by provider and case outcomes, provider errors
  by kind, retries and cache hits of cases that finished in it. They are rebuilt from rows
  on every scrape, so they are not monotonic counters: read them as they are (e.g.
  `histogram_quantile(0.95, sum by (le) (pcr_queue_wait_seconds_bucket))`), without rate().
  Keeping cumulative counters instead would need either shared state between processes or an
  aggregate over the whole history at every scrape.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse
from django.utils.crypto import constant_time_compare
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from testruns.reporting import queue_stats

QUEUE_WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
CASE_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)

# Provider errors are stored as text; their kind is read from the words providers.py writes.
_ERROR_KIND_SQL = """
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

# Cases that finished in the window, reached through the runs active in it (results are
# indexed by run; there is no index on their finish time).
_WINDOW_CASES = """
FROM testruns_testresult t JOIN testruns_testrun r ON r.id = t.run_id
JOIN testruns_provider p ON p.id = r.provider_id
WHERE t.run_id IN (SELECT id FROM testruns_testrun WHERE status = 'running'
                   OR finished_at >= now() - make_interval(secs => %(window)s))
  AND t.finished_at >= now() - make_interval(secs => %(window)s)
"""


def _rows(sql: str, params: dict | list | None = None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _bucket_columns(expression: str, buckets: Sequence[float]) -> str:
    counts = ", ".join(f"count(*) FILTER (WHERE {expression} <= {float(b)!r})" for b in buckets)
    return f"{counts}, count(*), COALESCE(sum({expression}), 0)"


def _histogram_buckets(values: Sequence, buckets: Sequence[float]) -> tuple[list, float]:
    """A row of _bucket_columns() as prometheus-client wants it: cumulative (le, count)
    pairs ending in +Inf, and the sum."""
    counts, total, value_sum = values[: len(buckets)], values[len(buckets)], values[-1]
    pairs = [(repr(float(b)), count) for b, count in zip(buckets, counts, strict=True)]
    return pairs + [("+Inf", total)], float(value_sum)


class DatabaseCollector(Collector):
    """Reads everything at scrape time; see the module docstring."""

    def collect(self) -> Iterator[Metric]:
        window = int(settings.METRICS_WINDOW_SECONDS)
        yield from self.runs()
        yield from self.semaphores()
        yield from self.workers()
        yield GaugeMetricFamily(
            "pcr_metrics_window_seconds",
            "The recent window that histograms and case counts cover.",
            value=window,
        )
        yield self.queue_wait(window)
        yield from self.cases(window)

    def runs(self) -> Iterator[Metric]:
        ((waiting, running),) = _rows(
            "SELECT count(*) FILTER (WHERE status = 'queued'), "
            "count(*) FILTER (WHERE status = 'running') FROM testruns_testrun "
            "WHERE status IN ('queued', 'running')"
        )
        yield GaugeMetricFamily("pcr_runs_waiting", "Runs waiting in the queue.", value=waiting)
        yield GaugeMetricFamily("pcr_runs_running", "Runs in flight.", value=running)

    def semaphores(self) -> Iterator[Metric]:
        in_use = GaugeMetricFamily(
            "pcr_semaphore_slots_in_use", "Slots held, per semaphore.", labels=["semaphore"]
        )
        limit = GaugeMetricFamily(
            "pcr_semaphore_slots_limit",
            "Slots allowed, per semaphore "
            "(for providers, lowered by 429s until calls succeed again).",
            labels=["semaphore"],
        )
        corrections = CounterMetricFamily(
            "pcr_semaphore_corrections",
            "Times the sweeper found a semaphore's in_use apart from its lease rows and reset "
            "it (each is also a warning in the workers' log).",
            labels=["semaphore"],
        )
        for name, configured, used, effective, corrected in _rows(
            'SELECT name, "limit", in_use, effective_limit, corrections FROM testruns_semaphore '
            "ORDER BY name"
        ):
            in_use.add_metric([name], used)
            limit.add_metric([name], min(configured, int(effective)) if effective else configured)
            corrections.add_metric([name], corrected)
        yield in_use
        yield limit
        yield corrections

    def workers(self) -> Iterator[Metric]:
        rows = [row for row in queue_stats.workers() if row["live"]]
        yield GaugeMetricFamily(
            "pcr_workers_live", "Worker processes with a recent heartbeat.", value=len(rows)
        )
        yield GaugeMetricFamily(
            "pcr_workers_accepting",
            "Live workers whose host has room for new cases.",
            value=sum(row["accepting"] for row in rows),
        )

    def queue_wait(self, window: int) -> Metric:
        wait = "extract(epoch FROM started_at - queued_at)::float8"
        (row,) = _rows(
            f"SELECT {_bucket_columns(wait, QUEUE_WAIT_BUCKETS)} FROM testruns_testrun "
            "WHERE started_at >= now() - make_interval(secs => %(window)s)",
            {"window": window},
        )
        family = HistogramMetricFamily(
            "pcr_queue_wait_seconds",
            "Time runs waited for a run slot (runs that started in the window).",
        )
        family.add_metric([], *_histogram_buckets(row, QUEUE_WAIT_BUCKETS))
        return family

    def cases(self, window: int) -> Iterator[Metric]:
        params = {"window": window}
        latency = HistogramMetricFamily(
            "pcr_case_latency_seconds",
            "Provider latency of cases that finished in the window.",
            labels=["provider"],
        )
        seconds = "(t.latency_ms / 1000.0)"
        for provider, *row in _rows(
            f"SELECT p.name, {_bucket_columns(seconds, CASE_LATENCY_BUCKETS)} "
            f"{_WINDOW_CASES} AND t.latency_ms IS NOT NULL GROUP BY p.name ORDER BY p.name",
            params,
        ):
            latency.add_metric([provider], *_histogram_buckets(row, CASE_LATENCY_BUCKETS))
        yield latency
        yield from self.case_counts(params)

    def case_counts(self, params: dict) -> Iterator[Metric]:
        outcomes = GaugeMetricFamily(
            "pcr_cases_finished",
            "Cases that finished in the window, by provider and status.",
            labels=["provider", "status"],
        )
        retries = GaugeMetricFamily(
            "pcr_case_retries",
            "Extra provider calls (retries) of cases that finished in the window.",
            labels=["provider"],
        )
        cache = GaugeMetricFamily(
            "pcr_cache_hits",
            "Cases answered from the response cache in the window.",
            labels=["provider"],
        )
        errors = GaugeMetricFamily(
            "pcr_provider_errors",
            "Cases that ended in a provider error in the window, by kind.",
            labels=["provider", "kind"],
        )
        per_provider: dict[str, tuple[int, int]] = {}
        for provider, status, count, extra_calls, hits in _rows(
            "SELECT p.name, t.status, count(*), COALESCE(sum(GREATEST(t.attempts - 1, 0)), 0),"
            f" count(*) FILTER (WHERE t.cached) {_WINDOW_CASES} GROUP BY p.name, t.status "
            "ORDER BY p.name, t.status",
            params,
        ):
            outcomes.add_metric([provider, status], count)
            before = per_provider.get(provider, (0, 0))
            per_provider[provider] = (before[0] + extra_calls, before[1] + hits)
        for provider, (extra_calls, hits) in per_provider.items():
            retries.add_metric([provider], extra_calls)
            cache.add_metric([provider], hits)
        for provider, kind, count in _rows(
            f"SELECT p.name, {_ERROR_KIND_SQL} AS kind, count(*) {_WINDOW_CASES} "
            "AND t.status = 'error' GROUP BY 1, 2 ORDER BY 1, 2",
            params,
        ):
            errors.add_metric([provider, kind], count)
        yield from (outcomes, retries, cache, errors)


registry = CollectorRegistry(auto_describe=False)
registry.register(DatabaseCollector())


def authorized(request: HttpRequest) -> bool:
    """With METRICS_TOKEN set, only scrapers that send it as a bearer token may read."""
    token = settings.METRICS_TOKEN
    if not token:
        return True
    return constant_time_compare(request.headers.get("Authorization", ""), f"Bearer {token}")


@login_not_required
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not authorized(request):
        response = HttpResponse(
            "A bearer token is required.\n", status=401, content_type="text/plain"
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    try:
        body = generate_latest(registry)
    except DatabaseError:
        return HttpResponse("The database cannot be read.\n", status=503, content_type="text/plain")
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
