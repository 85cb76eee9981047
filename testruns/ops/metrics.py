"""/metrics in Prometheus' text format, read from PostgreSQL at scrape time by one custom
collector, so any number of web and worker processes need no shared memory and every web
process answers the same.

- Counters (`_total`) and cumulative histograms (`_bucket`, `_count`, `_sum`) come from the
  MetricCounter rows that engine.counters adds to where things end: runs by final status,
  cases by status, provider errors by kind, retries and cache hits per provider, case latency
  per provider, queue wait, notifications sent and failed, schedule launches. They only grow,
  across processes, restarts and deleted runs, so `rate()` and `increase()` work on them.
- Gauges are levels only: runs waiting and running, slots in use and limits per semaphore,
  live and accepting workers. Plus a counter of corrections the sweeper made to slot counts
  (kept in the semaphore's row).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

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

from testruns.engine.counters import COUNTERS, HISTOGRAMS
from testruns.models import MetricCounter, NotificationRule, TestRun
from testruns.reporting import queue_stats

# Series shown at 0 before anything happened, so that rate() and alerts see them from the start.
KNOWN_LABELS = {
    "runs": [(status,) for status in TestRun.FINISHED],
    "notifications_sent": [(channel,) for channel in NotificationRule.Channel.values],
    "notifications_failed": [(channel,) for channel in NotificationRule.Channel.values],
    "notification_attempts_failed": [(channel,) for channel in NotificationRule.Channel.values],
    "schedule_launches": [("launched",), ("refused",)],
}


def _rows(sql: str, params: dict | list | None = None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


class DatabaseCollector(Collector):
    """Reads everything at scrape time; see the module docstring."""

    def collect(self) -> Iterator[Metric]:
        yield from self.runs()
        yield from self.semaphores()
        yield from self.workers()
        yield from self.counted()

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

    def counted(self) -> Iterator[Metric]:
        """Every counter and histogram, from one read of the counter rows."""
        series: dict[str, dict[tuple, float]] = defaultdict(dict)
        for name, labels, value in MetricCounter.objects.values_list("name", "labels", "value"):
            series[name][tuple(sorted(labels.items()))] = value
        for name, (help_text, label_names) in COUNTERS.items():
            family = CounterMetricFamily(f"pcr_{name}", help_text, labels=list(label_names))
            values = {
                tuple(dict(key).get(n, "") for n in label_names): v
                for key, v in series[name].items()
            }
            for known in KNOWN_LABELS.get(name, []):
                values.setdefault(known, 0.0)
            for label_values, value in sorted(values.items()):
                family.add_metric(list(label_values), value)
            yield family
        for name, (help_text, label_names, buckets) in HISTOGRAMS.items():
            yield self.histogram(name, help_text, label_names, buckets, series)

    @staticmethod
    def histogram(name, help_text, label_names, buckets, series) -> Metric:
        family = HistogramMetricFamily(f"pcr_{name}", help_text, labels=list(label_names))
        counts: dict[tuple, dict[str, float]] = defaultdict(dict)
        for key, value in series[f"{name}_bucket"].items():
            labels = dict(key)
            counts[tuple(labels.get(n, "") for n in label_names)][labels["le"]] = value
        totals = {
            tuple(dict(key).get(n, "") for n in label_names): value
            for key, value in series[f"{name}_count"].items()
        }
        sums = {
            tuple(dict(key).get(n, "") for n in label_names): value
            for key, value in series[f"{name}_sum"].items()
        }
        if not label_names:
            totals.setdefault((), 0.0)
        for label_values in sorted(set(counts) | set(totals)):
            found = counts.get(label_values, {})
            pairs = [(repr(float(b)), found.get(repr(float(b)), 0.0)) for b in buckets]
            pairs.append(("+Inf", totals.get(label_values, 0.0)))
            family.add_metric(list(label_values), pairs, sums.get(label_values, 0.0))
        return family


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
