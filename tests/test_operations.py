"""Operations: queue statistics, system resources and resource-aware admission, /metrics,
/healthz and structured logs, against the real database, Redis and worker processes."""

from __future__ import annotations

import io
import json
import logging
from datetime import timedelta

import pytest
from django.db.models.functions import Now
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from project.embedded import free_port
from testruns.engine import admission, counters, gate, launching, limits, settling
from testruns.models import TestRun, WorkerHeartbeat
from testruns.ops import host_load
from testruns.ops.log_context import JSONFormatter, PlainFormatter, RunContextFilter, log_context
from testruns.reporting import queue_stats
from tests.conftest import wait_for

db = pytest.mark.django_db


def client_for(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def ago(seconds: float):
    """A time by the database clock (in a test transaction, now() is its start)."""
    return Now() - timedelta(seconds=seconds)


def finish(run: TestRun, *, status: str, waited: float, ran: float, results: list[dict]) -> None:
    """Make a launched run look as if it waited `waited` s, ran `ran` s and just finished."""
    for position, fields in enumerate(results):
        run.results.filter(position=position).update(finished_at=ago(1), **fields)
    counts = {s: sum(r["status"] == s for r in results) for s in ("passed", "failed", "error")}
    TestRun.objects.filter(pk=run.pk).update(
        status=status,
        queued_at=ago(waited + ran),
        started_at=ago(ran),
        finished_at=ago(0),
        done_count=len(results),
        passed_count=counts["passed"],
        failed_count=counts["failed"],
        error_count=counts["error"],
    )


@pytest.fixture
def history(make_card, simulator):
    """Three finished runs (waits 2, 10 and 30 s; one succeeded, one error, one failed),
    one running and two waiting."""
    card = make_card(cases=3)
    runs = [launching.launch_run(card=card, provider=simulator) for _ in range(6)]
    finish(
        runs[0],
        status="succeeded",
        waited=2,
        ran=5,
        results=[
            {"status": "passed", "latency_ms": 50, "attempts": 3, "retries": 2},
            {"status": "passed", "latency_ms": 150, "attempts": 1, "cached": True},
            {"status": "passed", "latency_ms": 1500, "attempts": 1},
        ],
    )
    finish(
        runs[1],
        status="error",
        waited=10,
        ran=5,
        results=[
            {"status": "error", "error": "HTTP 429 rate limited", "attempts": 3, "retries": 2},
            {"status": "passed", "latency_ms": 100},
            {"status": "passed", "latency_ms": 100},
        ],
    )
    finish(
        runs[2],
        status="failed",
        waited=30,
        ran=5,
        results=[
            {"status": "failed", "latency_ms": 100},
            {"status": "error", "error": "timed out after 1.0s"},
            {"status": "passed"},
        ],
    )
    limits.ensure_semaphores(simulator)
    limits.set_limit(gate.RUNS, 1)
    admission.admit_runs()
    return runs


def fresh_heartbeat(holder: str, *, seen_ago: float = 0, **fields) -> WorkerHeartbeat:
    heartbeat = WorkerHeartbeat.objects.create(
        holder=holder,
        hostname=holder.split(":")[0],
        pid=int(holder.split(":")[1]),
        started_at=ago(600),
        last_seen=ago(seen_ago),
        **fields,
    )
    heartbeat.refresh_from_db()
    return heartbeat


# --- Queue statistics and resources ---------------------------------------------------------


@db
def test_queue_stats_count_the_queue_and_measure_waits_throughput_and_errors(history, launcher):
    body = client_for(launcher).get("/api/queue/stats/?window=3600").json()
    assert (body["waiting"], body["running"]) == (2, 1)
    assert body["limits"]["max_concurrent_runs"] == 1 and body["limits"]["runs_in_use"] == 1
    assert body["limits"]["max_queue_length"] == 1000
    assert [slot["name"] for slot in body["limits"]["slots"]][0] == "runs"
    # Waits of runs that started in the window: 2, 10, 30 and the running one's (~0).
    assert body["runs_started"] == 4
    assert body["p95_wait_seconds"] == pytest.approx(27, abs=1)
    assert body["mean_wait_seconds"] == pytest.approx(42 / 4, abs=1)
    assert body["runs_finished"] == 3 and body["throughput_runs_per_hour"] == 3
    assert body["run_error_rate"] == pytest.approx(1 / 3)
    assert body["cases_finished"] == 9 and body["case_error_rate"] == pytest.approx(2 / 9)
    assert body["waiting_reasons"] == ["all 1 run slots are in use", "no worker is running"]


@db
def test_queue_stats_window_is_checked(launcher):
    api = client_for(launcher)
    assert api.get("/api/queue/stats/?window=10").status_code == 400
    assert api.get("/api/queue/stats/?window=soon").status_code == 400
    assert api.get("/api/queue/stats/").json()["window_seconds"] == 3600


@db
def test_busy_workers_are_named_as_the_reason_runs_do_not_move(history, launcher):
    fresh_heartbeat("a:1", accepting=False, note="CPU 97% > 90%")
    fresh_heartbeat("b:2", accepting=False, note="free memory 180 MB < 512 MB")
    reasons = client_for(launcher).get("/api/queue/stats/").json()["waiting_reasons"]
    assert reasons == [
        "all 1 run slots are in use",
        "every worker is too busy to take new cases: CPU 97% > 90%; free memory 180 MB < 512 MB",
    ]
    fresh_heartbeat("c:3")
    assert client_for(launcher).get("/api/queue/stats/").json()["waiting_reasons"] == [
        "all 1 run slots are in use"
    ]


@db
def test_system_resources_show_the_host_and_every_worker_with_its_heartbeat(launcher, settings):
    settings.LEASE_TTL_SECONDS = 30
    fresh_heartbeat("alive:10", seen_ago=5, cpu_percent=12.5, accepting=True)
    fresh_heartbeat("paused:11", seen_ago=1, accepting=False, note="CPU 97% > 90%")
    fresh_heartbeat("dead:12", seen_ago=41)  # three missed beats plus the 10 s slack ago
    body = client_for(launcher).get("/api/system/resources/").json()
    assert body["host"]["memory_total_mb"] > body["host"]["memory_available_mb"] > 0
    assert len(body["host"]["load_average"]) == 3 and body["host"]["cpu_count"] >= 1
    assert body["limits"] == {"max_cpu_percent": None, "min_free_memory_mb": None}
    assert body["host_pressure"] is None
    workers = {w["holder"]: w for w in body["workers"]}
    assert {h: w["live"] for h, w in workers.items()} == {
        "alive:10": True,
        "paused:11": True,
        "dead:12": False,
    }
    assert workers["alive:10"]["seconds_since_heartbeat"] == pytest.approx(5, abs=1)
    assert workers["paused:11"]["note"] == "CPU 97% > 90%"
    assert (body["live_workers"], body["accepting_workers"]) == (2, 1)
    assert body["live_after_seconds"] == 40


def test_host_pressure_names_cpu_and_memory_beyond_their_thresholds(settings):
    busy = host_load.HostSnapshot(
        cpu_percent=97.2,
        memory_total_mb=8000,
        memory_available_mb=180,
        load_average=(3, 2, 1),
        cpu_count=2,
    )
    calm = host_load.HostSnapshot(
        cpu_percent=20,
        memory_total_mb=8000,
        memory_available_mb=4000,
        load_average=(0, 0, 0),
        cpu_count=2,
    )
    assert host_load.host_pressure(busy) is None  # both checks are off by default
    settings.WORKER_MAX_CPU_PERCENT = 90
    assert host_load.host_pressure(busy) == "CPU 97% > 90%"
    settings.WORKER_MIN_FREE_MEMORY_MB = 512
    assert host_load.host_pressure(busy) == "CPU 97% > 90%; free memory 180 MB < 512 MB"
    assert host_load.host_pressure(calm) is None
    settings.WORKER_MAX_CPU_PERCENT = 0
    settings.WORKER_MIN_FREE_MEMORY_MB = 10**9  # more than any host has: this host, measured
    assert host_load.host_pressure().startswith("free memory ")


# --- /metrics -------------------------------------------------------------------------------


def scrape(client, **headers) -> dict:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.content.decode())
        for s in family.samples
    }


@db
def test_metrics_are_counters_and_histograms_from_the_database_without_login(
    client, history, simulator
):
    fresh_heartbeat("w:1")
    assert settling.settle_finished_runs() == 3  # what every worker's sweep does
    counters.count_started_runs()
    samples = scrape(client)
    provider = (("provider", simulator.name),)
    # Gauges: levels only.
    assert samples[("pcr_runs_waiting", ())] == 2
    assert samples[("pcr_runs_running", ())] == 1
    assert samples[("pcr_semaphore_slots_in_use", (("semaphore", "runs"),))] == 1
    assert samples[("pcr_semaphore_slots_limit", (("semaphore", "runs"),))] == 1
    assert samples[("pcr_workers_live", ())] == 1
    # Counters of finished runs.
    for status, count in (("succeeded", 1), ("failed", 1), ("error", 1), ("cancelled", 0)):
        assert samples[("pcr_runs_total", (("status", status),))] == count
    assert samples[("pcr_cases_total", (*provider, ("status", "passed")))] == 6
    assert samples[("pcr_cases_total", (*provider, ("status", "error")))] == 2
    assert samples[("pcr_cases_total", (*provider, ("status", "failed")))] == 1
    errors = "pcr_provider_errors_total"
    assert samples[(errors, (("kind", "rate_limited"), *provider))] == 1
    assert samples[(errors, (("kind", "timeout"), *provider))] == 1
    assert samples[("pcr_case_retries_total", provider)] == 4
    assert samples[("pcr_cache_hits_total", provider)] == 1
    assert samples[("pcr_notifications_sent_total", (("channel", "webhook"),))] == 0
    # Cumulative histograms: case latency (finished runs), queue wait (started runs).
    latency = "pcr_case_latency_seconds_bucket"
    assert samples[(latency, (("le", "0.1"), *provider))] == 4
    assert samples[(latency, (("le", "0.25"), *provider))] == 5
    assert samples[(latency, (("le", "+Inf"), *provider))] == 6
    assert samples[("pcr_case_latency_seconds_sum", provider)] == pytest.approx(2.0)
    assert samples[("pcr_queue_wait_seconds_count", ())] == 4
    assert samples[("pcr_queue_wait_seconds_bucket", (("le", "5.0"),))] == 2
    assert samples[("pcr_queue_wait_seconds_bucket", (("le", "10.0"),))] == 3
    assert samples[("pcr_queue_wait_seconds_bucket", (("le", "+Inf"),))] == 4

    # Counting again counts nothing twice, and deleting runs takes nothing back.
    assert settling.settle_finished_runs() == 0
    counters.count_started_runs()
    TestRun.objects.filter(status__in=TestRun.FINISHED).delete()
    assert scrape(client) == samples | {("pcr_runs_waiting", ()): 2}


MONOTONIC = ("_total", "_bucket", "_count", "_sum")


@pytest.mark.django_db(transaction=True)
def test_counters_only_grow_across_scrapes_while_two_worker_processes_finish_runs(
    client, worker_factory, make_card, simulator
):
    simulator.parameters = {"latency_ms": 400, "jitter_ms": 0, "error_rate": 0}
    simulator.save()
    worker_factory(processes=2, threads=2)
    cards = [make_card(f"card-{i}", cases=3) for i in range(2)]
    runs = [launching.launch_run(card=cards[i % 2], provider=simulator) for i in range(8)]
    scrapes = [scrape(client)]

    def all_counted() -> bool:
        scrapes.append(scrape(client))
        return scrapes[-1].get(("pcr_queue_wait_seconds_count", ())) == len(runs) and sum(
            value for (name, _), value in scrapes[-1].items() if name == "pcr_runs_total"
        ) == len(runs)

    wait_for(all_counted, timeout=90, interval=0.2, what="every run to be counted")
    finished = [
        sum(value for (name, _), value in sample.items() if name == "pcr_runs_total")
        for sample in scrapes
    ]
    assert any(0 < count < len(runs) for count in finished), finished  # scraped meanwhile
    for earlier, later in zip(scrapes, scrapes[1:], strict=False):
        for key, value in earlier.items():
            if key[0].endswith(MONOTONIC):
                assert later.get(key, 0) >= value, key
    final = scrapes[-1]
    provider = (("provider", simulator.name),)
    assert final[("pcr_runs_total", (("status", "succeeded"),))] == 8
    assert final[("pcr_cases_total", (*provider, ("status", "passed")))] == 24
    assert final[("pcr_case_latency_seconds_count", provider)] == 24
    assert TestRun.objects.filter(settled_at=None).count() == 0

    TestRun.objects.filter(pk__in=[run.pk for run in runs]).delete()
    after = scrape(client)
    assert {k: v for k, v in after.items() if k[0].endswith(MONOTONIC)} == {
        k: v for k, v in final.items() if k[0].endswith(MONOTONIC)
    }


@db
def test_metrics_need_the_bearer_token_when_one_is_configured(client, settings):
    settings.METRICS_TOKEN = "s3cret-token"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert scrape(client, HTTP_AUTHORIZATION="Bearer s3cret-token")[("pcr_runs_waiting", ())] == 0


# --- /healthz -------------------------------------------------------------------------------


@db
def test_healthz_is_503_without_a_live_worker_and_needs_no_login(client, settings):
    settings.LEASE_TTL_SECONDS = 30
    fresh_heartbeat("old:1", seen_ago=45)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {
            "database": {"ok": True},
            "redis": {"ok": True},
            "workers": {
                "ok": False,
                "live": 0,
                "error": "no worker has sent a heartbeat in the last 40 seconds",
            },
        },
    }
    fresh_heartbeat("new:2", seen_ago=3)
    assert client.get("/healthz").json() == {
        "status": "ok",
        "checks": {
            "database": {"ok": True},
            "redis": {"ok": True},
            "workers": {"ok": True, "live": 1},
        },
    }


@db
def test_healthz_is_503_when_redis_is_down(client, settings):
    fresh_heartbeat("w:1")
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["checks"]["redis"] == {"ok": False, "error": "Redis cannot be reached"}
    assert response.json()["checks"]["database"] == {"ok": True}


@pytest.mark.django_db(transaction=True)
def test_healthz_follows_a_real_worker_and_its_json_logs_carry_run_and_case_ids(
    client, worker_factory, make_card, simulator
):
    assert client.get("/healthz").status_code == 503
    worker = worker_factory(processes=1, threads=2, env={"LOG_FORMAT": "json"})
    wait_for(
        lambda: client.get("/healthz").status_code == 200,
        timeout=60,
        what="the worker's first heartbeat",
    )
    assert queue_stats.live_worker_count() == 1

    run = launching.launch_run(card=make_card(cases=2), provider=simulator)
    wait_for(
        lambda: TestRun.objects.get(pk=run.pk).is_finished, timeout=60, what="the run to finish"
    )
    # The worker logs "run finished" just after its commit: wait for the line, not the row.
    wait_for(lambda: "run finished: succeeded" in worker.output(), what="the finish log line")
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    about_the_run = [line for line in lines if line["run_id"] == run.pk]
    assert {line["message"] for line in about_the_run} >= {
        "case started",
        "run finished: succeeded",
    }
    case_ids = set(run.results.values_list("case_id", flat=True))
    assert {line["case_id"] for line in about_the_run if line["message"] == "case started"} == (
        case_ids
    )

    worker.stop()  # a clean shutdown removes its heartbeat
    body = client.get("/healthz").json()
    assert body["status"] == "unavailable" and body["checks"]["workers"]["live"] == 0


# --- Logs -----------------------------------------------------------------------------------


def capture(formatter: logging.Formatter):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RunContextFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger("tests.operations.capture")
    logger.handlers, logger.propagate, logger.level = [handler], False, logging.INFO
    return logger, stream


def test_plain_log_lines_about_a_run_end_with_its_run_and_case_ids():
    logger, stream = capture(PlainFormatter())
    logger.info("run queued", extra={"run_id": 12})
    logger.info("case started", extra={"run_id": 12, "case_id": 345})
    with log_context(run_id=7, case_id=8):
        logger.info("calling the provider")
        logger.info("explicit ids win", extra={"run_id": 9})
    logger.info("nothing about a run")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("INFO tests.operations.capture run queued run=12")
    assert lines[1].endswith("case started run=12 case=345")
    assert lines[2].endswith("calling the provider run=7 case=8")
    assert lines[3].endswith("explicit ids win run=9 case=8")
    assert lines[4].endswith("nothing about a run")


def test_json_log_lines_are_one_object_each_with_the_ids():
    logger, stream = capture(JSONFormatter())
    with log_context(run_id=3):
        logger.warning("slow provider", extra={"case_id": 4})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["message"], first["level"], first["run_id"], first["case_id"]) == (
        "slow provider",
        "WARNING",
        3,
        4,
    )
    assert second["run_id"] is None and "ValueError: boom" in second["exception"]
