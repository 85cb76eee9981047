"""Benchmarks of the gate and the execution engine. One run prints one table.

    make bench                        # throwaway PostgreSQL and Redis, real worker processes
    BENCH_ONLY=makespan make bench    # one of: pairs, handover, makespan, long_run

Not a test: it asserts nothing and takes a few minutes. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("LOG_LEVEL", "WARNING")
# Production settings: with DEBUG on, Django's debug cursor times and keeps every query.
os.environ.setdefault("DEBUG", "0")
os.environ.setdefault("SECRET_KEY", "bench-only-" + "x" * 50)

import django  # noqa: E402

django.setup()

import multiprocessing

import psutil  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from dramatiq.rate_limits import ConcurrentRateLimiter
from dramatiq.rate_limits.backends import RedisBackend

from project.embedded import die_with_parent  # noqa: E402
from testruns.catalog import cards  # noqa: E402
from testruns.engine import admission, gate, launching, limits  # noqa: E402
from testruns.models import (  # noqa: E402
    Lease,
    PromptCard,
    Provider,
    Semaphore,
    TestCase,
    TestResult,
    TestRun,
)
from tests.fake_llm import FakeLLMServer

DURATION = float(os.environ.get("BENCH_SECONDS", "5"))
CONTENDERS = 16
ROWS: list[tuple[str, str, str]] = []


def report(name: str, value: str, target: str = "") -> None:
    ROWS.append((name, value, target))
    print(f"  {name}: {value}", flush=True)


def reset() -> None:
    for model in (Lease, TestResult, TestRun, TestCase, PromptCard, Provider, Semaphore):
        model.objects.all().delete()


def make_card(cases: int, template: str = "bench {{ i }}") -> PromptCard:
    card = PromptCard.objects.create(
        name="bench", slug=f"bench-{time.monotonic_ns()}", template=template
    )
    TestCase.objects.bulk_create(
        TestCase(card=card, name=f"case {i}", variables={"i": i}, assertions=[], order=i)
        for i in range(cases)
    )
    cards.snapshot_version(card)
    return card


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Workers:
    """Real Dramatiq worker processes on the same database and Redis."""

    def __init__(self, processes: int, threads: int):
        env = dict(os.environ, DATABASE_URL=database_url(), LOG_LEVEL="INFO")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "manage.py",
                "rundramatiq",
                "--processes",
                str(processes),
                "--threads",
                str(threads),
                "--worker-shutdown-timeout",
                "8000",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        ready = 0
        while ready < processes:
            line = self.process.stderr.readline()
            if not line:
                raise RuntimeError("workers exited during boot")
            ready += "ready for action" in line
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def family(self) -> list[psutil.Process]:
        parent = psutil.Process(self.process.pid)
        return [parent, *parent.children(recursive=True)]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def database_url() -> str:
    parts = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(parts._replace(path="/" + connection.settings_dict["NAME"]))


def wait_finished(run_ids: list[int], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while TestRun.objects.filter(pk__in=run_ids).exclude(status__in=TestRun.FINISHED).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("runs did not finish")
        time.sleep(0.05)


# --- 1. acquire + release pairs per second --------------------------------------------------


def bench_pairs() -> None:
    """16 contenders (4 processes x 4 threads, like workers), each holding one call slot of a
    provider (limit 16) and handing it on: give back the slot, promote the next waiting
    case and keep it, in one transaction each: exactly the gate's part of finishing a case.
    Beside it, Dramatiq's ConcurrentRateLimiter on the same Redis, also 4 x 4."""
    reset()
    provider = Provider.objects.create(name="p", kind="simulator", max_concurrency=CONTENDERS)
    card = make_card(1)
    limits.ensure_semaphores(provider)
    limits.set_limit(gate.RUNS, 0)  # keep the run out of the normal admission; we drive it
    run = launching.launch_run(card=card, provider=provider, max_concurrent_tests=CONTENDERS)
    TestResult.objects.filter(run=run).delete()
    TestResult.objects.bulk_create(
        TestResult(run=run, position=i, case_name="c", variables={}) for i in range(60_000)
    )
    TestRun.objects.filter(pk=run.pk).update(status="running")

    def hand_on(n: int, stop: threading.Event) -> int:
        me, pairs = f"bench:{os.getpid()}:{n}", 0
        with admission.handing_over_to(me) as taken:
            admission.admit_cases(provider.pk)
        lease = taken[0] if taken else None
        while lease and not stop.is_set():
            with admission.handing_over_to(me) as taken, transaction.atomic():
                admission.admit_next_cases(
                    provider.pk,
                    gate.give_back_case(provider.pk, lease.lease_id, succeeded=True).locked,
                )
            pairs += 1
            lease = taken[0] if taken else None
        return pairs

    report(
        "gate: acquire+release pairs/s, 16 contenders (PostgreSQL)",
        f"{contend(hand_on):,.0f}",
        ">= 1,000",
    )

    def acquire_release(n: int, stop: threading.Event) -> int:
        limiter = ConcurrentRateLimiter(
            RedisBackend(url=settings.REDIS_URL), "bench", limit=CONTENDERS
        )
        pairs = 0
        while not stop.is_set():
            with limiter.acquire(raise_on_failure=False) as acquired:
                pairs += bool(acquired)
        return pairs

    report(
        "Dramatiq ConcurrentRateLimiter pairs/s, 16 contenders (Redis)",
        f"{contend(acquire_release):,.0f}",
        "(reference)",
    )


def contend(work, processes: int = 4, threads: int = 4) -> float:
    """Run work(n, stop) in processes x threads for DURATION seconds; total calls per second."""

    connection.close()  # never share a connection across fork
    results = multiprocessing.get_context("fork").Queue()

    def process_main(first: int) -> None:
        stop, counts = threading.Event(), []
        pool = [
            threading.Thread(target=lambda n=n: counts.append(work(n, stop)))
            for n in range(first, first + threads)
        ]
        for thread in pool:
            thread.start()
        time.sleep(DURATION)  # the measuring window itself, not a wait for a condition
        stop.set()
        for thread in pool:
            thread.join()
        results.put(sum(counts))

    started = time.perf_counter()
    children = [
        multiprocessing.get_context("fork").Process(target=process_main, args=(p * threads,))
        for p in range(processes)
    ]
    for child in children:
        child.start()
    total = sum(results.get() for _ in children)
    for child in children:
        child.join()
    return total / (time.perf_counter() - started)


# --- 2. slot hand-over latency --------------------------------------------------------------


def bench_handover() -> None:
    """Run limit 1, 200 runs waiting behind a running one. For each run, from the database
    time its predecessor finished (and released the slot) to the moment its first provider
    call reached the fake OpenAI server."""

    reset()
    server = FakeLLMServer().start()
    provider = Provider.objects.create(
        name="fake", kind="openai", model="m", base_url=server.base_url, max_concurrency=8
    )
    limits.ensure_semaphores(provider)
    limits.set_limit(gate.RUNS, 1)
    card = make_card(201)
    cases = list(card.cases.order_by("order"))
    runs = [launching.launch_run(card=card, provider=provider, cases=[case]) for case in cases]
    workers = Workers(processes=1, threads=4)
    wait_finished([r.pk for r in runs])
    workers.stop()
    server.stop()
    first_call = {}
    for request in server.requests:
        prompt = request.body["messages"][-1]["content"]
        first_call.setdefault(prompt, request.received_at)
    ordered = list(TestRun.objects.filter(pk__in=[r.pk for r in runs]).order_by("started_at"))
    latencies = []
    for before, after in zip(ordered, ordered[1:], strict=False):
        prompt = f"bench {after.results.get().variables['i']}"
        latencies.append((first_call[prompt] - before.finished_at.timestamp()) * 1000)
    report(
        "hand-over latency p50, 200 runs waiting",
        f"{percentile(latencies, 0.5):.1f} ms",
        "<= 10 ms",
    )
    report(
        "hand-over latency p99, 200 runs waiting",
        f"{percentile(latencies, 0.99):.1f} ms",
        "<= 50 ms",
    )


# --- 3. makespan ----------------------------------------------------------------------------


def bench_makespan() -> None:
    """1,000 cases, 8 call slots, a simulated 100 ms provider: ideal is 125 waves x 100 ms."""
    reset()
    provider = Provider.objects.create(
        name="sim",
        kind="simulator",
        max_concurrency=8,
        parameters={"latency_ms": 100, "jitter_ms": 0, "error_rate": 0},
    )
    card = make_card(1000)
    workers = Workers(processes=2, threads=4)  # booted before the clock starts at launch
    run = launching.launch_run(card=card, provider=provider, max_concurrent_tests=8)
    wait_finished([run.pk])
    workers.stop()
    run.refresh_from_db()
    makespan = (run.finished_at - run.started_at).total_seconds()
    ideal = 125 * 0.1
    report("makespan, 1,000 cases, 8 slots, 100 ms", f"{makespan:.2f} s (ideal {ideal:.1f} s)")
    report("makespan efficiency", f"{100 * ideal / makespan:.1f} %", ">= 95 %")


# --- 4. CPU and memory over a long run -----------------------------------------------------


def bench_long_run(cases: int = 10_000) -> None:
    """A 10,000-case run on a zero-latency simulator: worker CPU per case, and worker memory
    sampled through the run (it must stay flat)."""
    reset()
    provider = Provider.objects.create(
        name="sim0",
        kind="simulator",
        max_concurrency=8,
        parameters={"latency_ms": 0, "jitter_ms": 0, "error_rate": 0},
    )
    run = launching.launch_run(card=make_card(cases), provider=provider, max_concurrent_tests=8)
    workers = Workers(processes=1, threads=8)
    samples: list[tuple[int, float]] = []
    cpu = 0.0
    while True:
        done = TestRun.objects.values_list("done_count", flat=True).get(pk=run.pk)
        family = workers.family()
        rss = sum(p.memory_info().rss for p in family) / 2**20
        cpu = sum(sum(p.cpu_times()[:2]) for p in family)
        samples.append((done, rss))
        if done >= cases:
            break
        time.sleep(0.5)
    workers.stop()
    peak = max(rss for _, rss in samples)
    at = {q: next(rss for done, rss in samples if done >= q * cases) for q in (0.1, 0.5, 1.0)}
    report("worker CPU per case (10,000 cases)", f"{1000 * cpu / cases:.2f} ms")
    report(
        "worker memory at 10 % / 50 % / 100 % of the run",
        " / ".join(f"{at[q]:.0f}" for q in (0.1, 0.5, 1.0)) + " MiB",
        "flat",
    )
    report("peak worker memory", f"{peak:.0f} MiB")


def main() -> None:
    call_command("migrate", verbosity=0)
    print(
        f"PostgreSQL {connection.pg_version / 10000:.0f}, {os.cpu_count()} CPUs; "
        f"{DURATION:.0f} s windows",
        flush=True,
    )
    only = os.environ.get("BENCH_ONLY", "")  # e.g. BENCH_ONLY=makespan
    for bench in (bench_pairs, bench_handover, bench_makespan, bench_long_run):
        if only and only not in bench.__name__:
            continue
        print(f"{bench.__name__}...", flush=True)
        bench()
    width = max(len(name) for name, _, _ in ROWS)
    print(f"\n| {'measure'.ljust(width)} | result | target |")
    print(f"|{'-' * (width + 2)}|--------|--------|")
    for name, value, target in ROWS:
        print(f"| {name.ljust(width)} | {value} | {target} |")


if __name__ == "__main__":
    main()
