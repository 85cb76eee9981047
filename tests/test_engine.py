"""The execution engine across real processes: Dramatiq workers, PostgreSQL, Redis and a fake
OpenAI-compatible server over HTTP that records its peak concurrency."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from django.db import connection, connections
from django.db.models import Count

from project.embedded import free_port
from testruns.engine import gate, launching, limits
from testruns.models import Lease, Provider, Semaphore, TestResult, TestRun, WorkerHeartbeat
from tests.conftest import ROOT, wait_for
from tests.fake_llm import FakeReply

pytestmark = pytest.mark.django_db(transaction=True)

FAST_LEASES = {"LEASE_TTL_SECONDS": "2", "SWEEP_INTERVAL_SECONDS": "0.5"}


@pytest.fixture
def llm_provider(fake_llm):
    return Provider.objects.create(
        name="Fake OpenAI",
        kind=Provider.Kind.OPENAI,
        model="fake-1",
        base_url=fake_llm.base_url,
        max_concurrency=4,
        timeout_seconds=30,
        price_input_per_mtok=1,
        price_output_per_mtok=2,
    )


def set_run_limit(limit: int, provider: Provider) -> None:
    limits.ensure_semaphores(provider)
    limits.set_limit(gate.RUNS, limit)


def all_finished(runs) -> bool:
    return (
        not TestRun.objects.filter(pk__in=[r.pk for r in runs])
        .exclude(status__in=TestRun.FINISHED)
        .exists()
    )


def max_overlap(intervals) -> int:
    """Most intervals open at one instant (an end at t closes before a start at t opens)."""
    points = sorted(
        [(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
        key=lambda p: (p[0], p[1]),
    )
    level = peak = 0
    for _, step in points:
        level += step
        peak = max(peak, level)
    return peak


class LeaseSampler(threading.Thread):
    """Watches the lease table while work runs and keeps the highest counts seen."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peak = Counter()

    def run(self):

        while not self.stop.wait(0.02):
            for name, n in Lease.objects.values_list("semaphore__name").annotate(n=Count("id")):
                self.peak[name] = max(self.peak[name], n)
        connection.close()


def test_limits_hold_across_worker_processes_and_every_run_finishes(
    worker_factory, fake_llm, llm_provider, make_card
):
    fake_llm.latency = 0.1
    set_run_limit(3, llm_provider)
    card = make_card(cases=3)
    sampler = LeaseSampler()
    sampler.start()
    runs = [
        launching.launch_run(
            card=card, provider=llm_provider, max_concurrent_tests=2, priority=i % 3
        )
        for i in range(24)
    ]
    for _ in range(3):
        worker_factory(processes=1, threads=4)
    wait_for(lambda: all_finished(runs), timeout=180, what="every run to finish")
    sampler.stop.set()
    sampler.join()

    finished = TestRun.objects.filter(pk__in=[r.pk for r in runs])
    assert set(finished.values_list("status", flat=True)) == {"succeeded"}
    assert TestResult.objects.filter(run__in=finished, status="passed").count() == 72
    assert max_overlap(finished.values_list("started_at", "finished_at")) <= 3
    assert sampler.peak[gate.RUNS] <= 3
    assert sampler.peak[gate.provider_semaphore(llm_provider.pk)] <= 4
    assert fake_llm.peak_concurrency <= 4
    assert fake_llm.peak_concurrency >= 2  # the limit was the ceiling, not one at a time
    assert not Lease.objects.exists()
    assert Semaphore.objects.get(name=gate.RUNS).in_use == 0


def test_start_order_follows_priority_then_queue_time(
    worker_factory, fake_llm, llm_provider, make_card
):
    set_run_limit(1, llm_provider)
    card = make_card(cases=1)
    launched = {
        name: launching.launch_run(card=card, provider=llm_provider, priority=priority)
        for name, priority in [("a", 0), ("b", 0), ("c", 5), ("d", 0), ("e", 5)]
    }
    worker_factory(processes=1, threads=2)
    wait_for(lambda: all_finished(launched.values()), timeout=60, what="runs to finish")
    by_start = TestRun.objects.filter(pk__in=[r.pk for r in launched.values()]).order_by(
        "started_at"
    )
    names = {run.pk: name for name, run in launched.items()}
    # "a" had the free slot at launch; the rest waited and started by priority, then age.
    assert [names[run.pk] for run in by_start] == ["a", "c", "e", "b", "d"]


def test_sigkilled_worker_slot_returns_after_ttl_and_each_case_has_one_result(
    worker_factory, fake_llm, llm_provider, make_card, settings
):
    settings.LEASE_TTL_SECONDS = 2
    fake_llm.latency = 1.5
    run = launching.launch_run(
        card=make_card(cases=4), provider=llm_provider, max_concurrent_tests=2
    )
    doomed = worker_factory(processes=1, threads=2, env=FAST_LEASES)
    wait_for(lambda: fake_llm.in_flight >= 2, what="the worker to be mid-call")
    held = set(Lease.objects.filter(result__isnull=False).values_list("holder", flat=True))
    doomed.stop(signal.SIGKILL)

    survivor = worker_factory(processes=1, threads=2, env=FAST_LEASES)
    wait_for(lambda: all_finished([run]), timeout=60, what="the run to finish")
    run.refresh_from_db()
    assert run.status == "succeeded" and run.done_count == 4
    results = TestResult.objects.filter(run=run)
    assert sorted(results.values_list("case__name", flat=True)) == [f"case {i}" for i in range(4)]
    assert set(results.values_list("status", flat=True)) == {"passed"}
    assert fake_llm.request_count >= 6  # the two interrupted cases were called again
    assert not Lease.objects.filter(holder__in=held).exists()
    assert not Lease.objects.exists() and Semaphore.objects.get(name=gate.RUNS).in_use == 0
    assert "expired case lease(s)" in survivor.output()


def test_cancelling_a_waiting_and_a_running_run(worker_factory, fake_llm, llm_provider, make_card):
    set_run_limit(1, llm_provider)
    fake_llm.latency = 0.4
    card = make_card(cases=10)
    running = launching.launch_run(card=card, provider=llm_provider, max_concurrent_tests=1)
    waiting = launching.launch_run(card=card, provider=llm_provider)
    worker_factory(processes=1, threads=2)
    wait_for(
        lambda: TestResult.objects.filter(run=running, status="passed").exists(),
        what="the first case to pass",
    )

    assert launching.cancel_run(waiting)
    waiting.refresh_from_db()
    assert (waiting.status, waiting.started_at) == ("cancelled", None)

    assert launching.cancel_run(running)
    # Its slots are free as soon as cancel_run returns, with the call still in flight.
    assert not Lease.objects.filter(run=running).exists()
    assert Semaphore.objects.get(name=gate.RUNS).in_use == 0
    running.refresh_from_db()
    kept = TestResult.objects.filter(run=running, status="passed").count()
    assert running.status == "cancelled" and kept >= 1
    assert TestResult.objects.filter(run=running, status="skipped").count() == 10 - kept

    wait_for(lambda: fake_llm.in_flight == 0, what="the abandoned call to end")
    assert TestResult.objects.filter(run=running, status="passed").count() == kept
    assert not launching.cancel_run(running)  # cancelling twice is a no-op


def test_provider_errors_retry_then_succeed_or_are_recorded(
    worker_factory, fake_llm, llm_provider, make_card
):
    calls = Counter()

    def behave(prompt: str):
        calls[prompt] += 1
        if "rate" in prompt:
            return (
                FakeReply(status=429, headers={"Retry-After": "1"})
                if calls[prompt] == 1
                else "ok after waiting"
            )
        if "broken" in prompt:
            return FakeReply(status=500, body={"error": {"message": "upstream exploded"}})
        if "hang" in prompt:
            return FakeReply(hang=True)
        return "fine"

    fake_llm.reply_with(behave)
    card = make_card(cases=0, template="{{ name }}")
    for name in ["rate", "broken", "hang"]:
        card.cases.create(name=name, variables={"name": name}, assertions=[])
    run = launching.launch_run(card=card, provider=llm_provider, max_retries=2, timeout_seconds=1.5)
    worker_factory(processes=1, threads=3)
    wait_for(lambda: all_finished([run]), timeout=90, what="the run to finish")

    results = {r.case_name: r for r in TestResult.objects.filter(run=run)}
    assert (results["rate"].status, results["rate"].attempts) == ("passed", 2)
    assert results["rate"].output == "ok after waiting"
    assert (results["broken"].status, results["broken"].attempts) == ("error", 3)
    assert "HTTP 500" in results["broken"].error and "upstream exploded" in results["broken"].error
    assert results["hang"].status == "error" and "timed out" in results["hang"].error
    run.refresh_from_db()
    assert run.status == "error" and (run.passed_count, run.error_count) == (1, 2)
    # The 429 halved the provider's effective concurrency; one success only starts recovery.
    semaphore = Semaphore.objects.get(name=gate.provider_semaphore(llm_provider.pk))
    assert semaphore.effective_limit is not None and semaphore.effective_limit < 4


def test_run_launched_while_broker_is_down_runs_once_it_is_back(
    worker_factory, process_env, fake_llm, llm_provider, make_card
):
    card = make_card(cases=2)
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    launch = (
        f"from testruns.models import *; from testruns.engine.launching import launch_run; "
        f"print(launch_run(card=PromptCard.objects.get(pk={card.pk}), "
        f"provider=Provider.objects.get(pk={llm_provider.pk})).pk)"
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", launch],
        env=process_env | {"REDIS_URL": dead_redis},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "broker unreachable" in result.stderr
    run = TestRun.objects.get(pk=int(result.stdout.split()[-1]))
    assert TestResult.objects.filter(run=run, dispatched_at=None).count() == 2

    worker_factory(processes=1, threads=2, env={"SWEEP_INTERVAL_SECONDS": "0.5"})
    wait_for(lambda: all_finished([run]), timeout=60, what="the re-sent run to finish")
    run.refresh_from_db()
    assert run.status == "succeeded" and run.passed_count == 2


def test_sigterm_hands_back_held_cases_and_releases_leases(
    worker_factory, fake_llm, llm_provider, make_card
):
    fake_llm.latency = 60
    run = launching.launch_run(card=make_card(cases=2), provider=llm_provider, timeout_seconds=120)
    worker = worker_factory(processes=1, threads=2)
    wait_for(lambda: fake_llm.in_flight == 2, timeout=60, what="both cases to be mid-call")
    worker.process.send_signal(signal.SIGTERM)  # to the Dramatiq master, as a supervisor does
    worker.process.wait(timeout=30)  # its grace period for in-flight work is 10 s
    assert "handed back 2 unfinished case(s) on shutdown" in worker.output()
    assert not Lease.objects.filter(result__isnull=False).exclude(holder="").exists()

    fake_llm.latency = 0
    worker_factory(processes=1, threads=2)
    wait_for(lambda: all_finished([run]), timeout=60, what="another worker to finish it")
    run.refresh_from_db()
    assert run.status == "succeeded" and run.passed_count == 2


def test_a_stalled_sweep_never_lets_a_live_workers_lease_expire(
    worker_factory, fake_llm, llm_provider, make_card
):
    """A worker's sweep blocks (here on a lock its queries need, as it would on a slow broker
    or database) for three lease TTLs while the worker is mid-call. The heartbeat has a thread
    of its own, so the case's lease keeps being renewed, nobody reclaims it, and the paid call
    is made once."""
    ttl = 2.0
    fake_llm.latency = 12  # the call outlasts the stall
    run = launching.launch_run(card=make_card(cases=1), provider=llm_provider, timeout_seconds=60)
    worker_factory(
        processes=1,
        threads=1,
        env={"LEASE_TTL_SECONDS": str(ttl), "SWEEP_INTERVAL_SECONDS": "0.2"},
    )
    wait_for(lambda: fake_llm.in_flight == 1, what="the case to be mid-call")

    def lease_seconds_left() -> float:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT extract(epoch FROM min(expires_at) - now()), max(expires_at) "
                "FROM testruns_lease WHERE result_id IS NOT NULL"
            )
            return cursor.fetchone()

    blocker = connections.create_connection("default")
    try:
        with blocker.cursor() as cursor:
            blocker.set_autocommit(False)
            # Every sweep reads runs; the heartbeat touches only leases and its own row.
            cursor.execute("LOCK TABLE testruns_testrun IN ACCESS EXCLUSIVE MODE")
            wait_for(
                lambda: TestRun.objects.raw(
                    "SELECT 1 AS id FROM pg_locks WHERE NOT granted "
                    "AND relation = 'testruns_testrun'::regclass"
                ).__len__(),
                what="the worker's sweep to wait on the lock",
            )
            samples = []
            stalled_until = time.monotonic() + 3 * ttl
            while time.monotonic() < stalled_until:
                samples.append(lease_seconds_left())
                time.sleep(0.2)  # the sampling period, not a wait for a condition
            blocker.rollback()
    finally:
        blocker.close()

    assert all(left is not None and left > 0 for left, _ in samples), samples
    assert len({renewed_to for _, renewed_to in samples}) >= 3  # renewed all along
    wait_for(lambda: all_finished([run]), timeout=60, what="the case to finish")
    result = run.results.get()
    assert (result.status, result.attempts) == ("passed", 1)
    assert fake_llm.request_count == 1


def test_a_cancelled_case_stops_holding_its_worker_thread(
    worker_factory, fake_llm, llm_provider, make_card
):
    fake_llm.reply_with(lambda prompt: FakeReply(hang=True) if prompt == "hang" else "N0 ok")
    card = make_card(slug="stuck", cases=0, template="{{ name }}")
    card.cases.create(name="hang", variables={"name": "hang"})
    hanging = launching.launch_run(card=card, provider=llm_provider, timeout_seconds=120)
    worker_factory(processes=1, threads=1, env={"SWEEP_INTERVAL_SECONDS": "0.5"})
    wait_for(lambda: fake_llm.in_flight == 1, what="the only worker thread to be mid-call")

    assert launching.cancel_run(hanging)
    # Had its one thread kept waiting on the hanging call, this run could not start.
    quick = launching.launch_run(card=make_card(slug="quick", cases=1), provider=llm_provider)
    wait_for(lambda: all_finished([quick]), timeout=30, what="the freed thread to run it")
    quick.refresh_from_db()
    assert quick.status == "succeeded"
    assert fake_llm.in_flight == 1  # the abandoned call itself runs out on its own timeout


def test_a_busy_host_leaves_cases_to_other_workers(
    worker_factory, fake_llm, llm_provider, make_card
):

    busy = worker_factory(processes=1, threads=2, env={"WORKER_MIN_FREE_MEMORY_MB": str(10**12)})
    wait_for(
        lambda: WorkerHeartbeat.objects.filter(accepting=False).exists(),
        what="the busy worker to say so",
    )
    note = WorkerHeartbeat.objects.get(accepting=False).note
    assert note.startswith("free memory") and "MB <" in note

    run = launching.launch_run(card=make_card(cases=3), provider=llm_provider)
    wait_for(lambda: "goes back to the broker" in busy.output(), what="the busy host to pass")
    worker_factory(processes=1, threads=2)
    wait_for(lambda: all_finished([run]), timeout=60, what="the other worker to run it")
    run.refresh_from_db()
    assert run.status == "succeeded" and run.passed_count == 3


def test_cancelling_a_run_with_repeats_keeps_the_calls_already_paid_for(
    worker_factory, fake_llm, llm_provider, make_card
):
    answers = itertools.count()
    # Two answers, then the third call of the case hangs until the run is cancelled.
    fake_llm.reply_with(lambda prompt: FakeReply(hang=True) if next(answers) >= 2 else "N0 ok")
    run = launching.launch_run(
        card=make_card(cases=1), provider=llm_provider, repeats=5, timeout_seconds=120
    )
    worker_factory(processes=1, threads=1, env={"SWEEP_INTERVAL_SECONDS": "0.5"})
    wait_for(lambda: fake_llm.in_flight == 1 and len(fake_llm.requests) == 3, what="call 3")

    assert launching.cancel_run(run)
    (result,) = TestResult.objects.filter(run=run)
    wait_for(
        lambda: TestResult.objects.filter(pk=result.pk, attempts__gt=0).exists(),
        what="the worker to keep what the case had spent",
    )
    result.refresh_from_db()
    run.refresh_from_db()
    assert (run.status, result.status) == ("cancelled", "skipped")
    assert [r["output"] for r in result.repeat_results] == ["N0 ok", "N0 ok"]
    assert result.tokens_out > 0 and result.cost > 0
    assert (run.tokens_in, run.tokens_out, run.cost) == (
        result.tokens_in,
        result.tokens_out,
        result.cost,
    )
    assert "cancelled" in result.error
