"""Benchmarks of the gate and the execution engine. One run prints one table.

    make bench                        # throwaway PostgreSQL and Redis, real worker processes
    BENCH_ONLY=makespan make bench    # one of: pairs, handover, makespan, long_run
    BENCH_BEFORE=1 make bench         # BENCH_BASELINE's own table first (before / after)

Not a test: it asserts nothing and takes a few minutes. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import django_env  # noqa: I001 (first: the settings and the path)

django_env.setup()
ROOT = django_env.ROOT

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
        connected_before = client_connections()
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
        # Booted means every worker thread holds its database connection (opened at thread
        # boot), so that a measure starting now does not time connection setup.
        deadline = time.monotonic() + 60
        while client_connections() < connected_before + processes * threads:
            if time.monotonic() > deadline:
                raise RuntimeError("worker threads did not connect")
            time.sleep(0.02)

    def family(self) -> list[psutil.Process]:
        parent = psutil.Process(self.process.pid)
        return [parent, *parent.children(recursive=True)]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def client_connections() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend'"
        )
        return cursor.fetchone()[0]


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
    provider (limit 16) and handing it on as a worker thread finishing a case does: one call
    of gate.close_case writes the case's outcome and totals, gives back the slot, promotes
    the next waiting case and keeps it. Beside it, in the same run: a minimal one-row
    semaphore in PostgreSQL (lock the row, insert or delete a lease, update the count; one
    transaction to acquire, one to release), the reference for what a hot row allows, and
    Dramatiq's ConcurrentRateLimiter on the same Redis, also 4 x 4."""
    reset()
    provider = Provider.objects.create(name="p", kind="simulator", max_concurrency=CONTENDERS)
    card = make_card(1)
    limits.ensure_semaphores(provider)
    limits.set_limit(gate.RUNS, 0)  # keep the run out of the normal admission; we drive it
    run = launching.launch_run(card=card, provider=provider, max_concurrent_tests=CONTENDERS)
    TestResult.objects.filter(run=run).delete()
    TestResult.objects.bulk_create(
        TestResult(run=run, position=i, case_name="c", variables={}) for i in range(200_000)
    )
    TestRun.objects.filter(pk=run.pk).update(status="running", total_cases=200_000)

    def hand_on(n: int, stop: threading.Event) -> int:
        me, pairs = f"bench:{os.getpid()}:{n}", 0
        with admission.handing_over_to(me) as taken:
            admission.admit_cases(provider.pk)
        lease = taken[0] if taken else None
        while lease and not stop.is_set():
            with admission.handing_over_to(me) as taken:
                admission.close_case(
                    lease_id=lease.lease_id,
                    result_id=lease.result_id,
                    run_id=run.pk,
                    provider_id=provider.pk,
                    status="passed",
                    fields={"output": "ok", "latency_ms": 1.0},
                    succeeded=True,
                    skip_rest=False,
                    event_interval=0.25,
                )
            pairs += 1
            lease = taken[0] if taken else None
        return pairs

    with connection.cursor() as cursor:
        cursor.execute(
            "DROP TABLE IF EXISTS bench_lease, bench_semaphore; "
            "CREATE TABLE bench_semaphore (id int PRIMARY KEY, lim int, in_use int); "
            "CREATE TABLE bench_lease (id bigserial PRIMARY KEY, holder text); "
            "INSERT INTO bench_semaphore VALUES (1, %s, 0)",
            [CONTENDERS],
        )

    def minimal(n: int, stop: threading.Event) -> int:
        pairs = 0
        with connection.cursor() as cursor:
            while not stop.is_set():
                with transaction.atomic():
                    cursor.execute(
                        "SELECT lim, in_use FROM bench_semaphore WHERE id = 1 FOR UPDATE"
                    )
                    lim, in_use = cursor.fetchone()
                    if in_use >= lim:
                        continue
                    cursor.execute("INSERT INTO bench_lease (holder) VALUES (%s) RETURNING id", [n])
                    (lease,) = cursor.fetchone()
                    cursor.execute("UPDATE bench_semaphore SET in_use = in_use + 1 WHERE id = 1")
                with transaction.atomic():
                    cursor.execute("SELECT 1 FROM bench_semaphore WHERE id = 1 FOR UPDATE")
                    cursor.execute("DELETE FROM bench_lease WHERE id = %s", [lease])
                    cursor.execute("UPDATE bench_semaphore SET in_use = in_use - 1 WHERE id = 1")
                pairs += 1
        return pairs

    def acquire_release(n: int, stop: threading.Event) -> int:
        limiter = ConcurrentRateLimiter(
            RedisBackend(url=settings.REDIS_URL), "bench", limit=CONTENDERS
        )
        pairs = 0
        while not stop.is_set():
            with limiter.acquire(raise_on_failure=False) as acquired:
                pairs += bool(acquired)
        return pairs

    # Interleaved, so that a slower minute of a shared machine falls on all three.
    rounds = int(os.environ.get("BENCH_PAIR_ROUNDS", "3"))
    figures: dict[str, list[float]] = {"gate": [], "minimal": [], "dramatiq": []}
    for _ in range(rounds):
        figures["gate"].append(contend(hand_on))
        with connection.cursor() as cursor:  # the cases still held go back, for the next round
            cursor.execute(
                "DELETE FROM testruns_lease WHERE result_id IS NOT NULL; "
                "UPDATE testruns_semaphore s SET in_use = "
                "(SELECT count(*) FROM testruns_lease l WHERE l.semaphore_id = s.id); "
                "UPDATE testruns_testresult SET status = 'pending' WHERE status = 'running'"
            )
        figures["minimal"].append(contend(minimal))
        figures["dramatiq"].append(contend(acquire_release))
    gate_rate, minimal_rate, dramatiq_rate = (
        statistics.median(figures[k]) for k in ("gate", "minimal", "dramatiq")
    )
    report(
        "gate hand-on pairs/s, 16 contenders (median of rounds)",
        " / ".join(f"{v:,.0f}" for v in figures["gate"]),
    )
    report(
        "minimal one-row semaphore pairs/s (reference)",
        " / ".join(f"{v:,.0f}" for v in figures["minimal"]),
    )
    report(
        "Dramatiq ConcurrentRateLimiter pairs/s (reference)",
        " / ".join(f"{v:,.0f}" for v in figures["dramatiq"]),
    )
    report("gate / minimal semaphore", f"{gate_rate / minimal_rate:.2f}", ">= 0.80")
    report("gate / Dramatiq limiter", f"{gate_rate / dramatiq_rate:.2f}", ">= 3")
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS bench_lease, bench_semaphore")


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
    reference = empty_transaction_and_request()
    report(
        "hand-over latency p50 / p99, 200 runs waiting",
        f"{percentile(latencies, 0.5):.1f} / {percentile(latencies, 0.99):.1f} ms",
        "<= 5 / <= 25 ms",
    )
    report(
        "reference: one empty transaction + one request to the fake vendor, p50 / p99",
        f"{percentile(reference, 0.5):.1f} / {percentile(reference, 0.99):.1f} ms",
    )


def empty_transaction_and_request(times: int = 200) -> list[float]:
    """The floor under a hand-over on this machine at this minute: a transaction that does
    nothing, then one chat completion from the fake vendor (served again for the measure)."""
    server = FakeLLMServer().start()
    url = urlsplit(server.base_url)
    # Bytes, so that http.client sends headers and body in one write (with a str it sends
    # two, and Nagle's algorithm meets the server's delayed ACK: 40 ms per request).
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode()
    vendor = http.client.HTTPConnection(url.hostname, url.port)  # kept alive, as workers do
    took = []
    for _ in range(times):
        started = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        vendor.request("POST", f"{url.path}/chat/completions", body)
        vendor.getresponse().read()
        took.append((time.perf_counter() - started) * 1000)
    vendor.close()
    server.stop()
    return took


# --- 3. makespan ----------------------------------------------------------------------------


def bench_makespan() -> None:
    """1,000 cases, 8 call slots, a simulated provider answering in 100 ms and in 1 s (a
    realistic vendor): the ideal is 125 waves of one latency each."""
    latencies = [float(x) for x in os.environ.get("BENCH_MAKESPAN_LATENCIES", "0.1,1").split(",")]
    for latency in latencies:
        reset()
        provider = Provider.objects.create(
            name="sim",
            kind="simulator",
            max_concurrency=8,
            parameters={"latency_ms": latency * 1000, "jitter_ms": 0, "error_rate": 0},
        )
        card = make_card(1000)
        workers = Workers(processes=2, threads=4)  # booted before the clock starts at launch
        run = launching.launch_run(card=card, provider=provider, max_concurrent_tests=8)
        wait_finished([run.pk])
        workers.stop()
        run.refresh_from_db()
        makespan = (run.finished_at - run.started_at).total_seconds()
        ideal = 125 * latency
        report(
            f"makespan efficiency, 1,000 cases, 8 slots, {latency * 1000:.0f} ms",
            f"{100 * ideal / makespan:.1f} % ({makespan:.2f} s, ideal {ideal:.1f} s)",
            ">= 97 %" if latency < 1 else ">= 99.5 %",
        )
        hot, cold = cold_code_penalty(latency)
        report(
            f"  reference: one ORM query compiled hot / after sleeping {latency * 1000:.0f} ms",
            f"{hot:.2f} / {cold:.2f} ms",
        )
        finished = sorted(run.results.values_list("finished_at", flat=True))
        report(
            f"  where the rest went ({latency * 1000:.0f} ms): admission to first answer "
            "minus latency / per wave / last answer to run finished",
            f"{((finished[0] - run.started_at).total_seconds() - latency) * 1000:.0f} ms / "
            f"{((finished[-1] - finished[0]).total_seconds() / 124 - latency) * 1000:.1f} ms / "
            f"{(run.finished_at - finished[-1]).total_seconds() * 1000:.0f} ms",
        )


def cold_code_penalty(idle: float, times: int = 20) -> tuple[float, float]:
    """CPU of the same code (compiling one ORM query) run back to back and right after
    sleeping `idle` seconds, medians in ms. A worker thread runs a case's path right after its
    call's wait; on a shared VM its caches are cold by then and the path costs 2-3x what it
    costs hot, which the per-wave overhead above pays in full."""

    def compile_once() -> float:
        started = time.thread_time()
        str(TestResult.objects.select_related("run__version", "run__provider").filter(pk=1).query)
        return (time.thread_time() - started) * 1000

    hot = [compile_once() for _ in range(times)]
    cold = []
    for _ in range(times):
        time.sleep(idle)  # the idle spell itself is what is measured, not a wait
        cold.append(compile_once())
    return statistics.median(hot), statistics.median(cold)


# --- 4. CPU and memory over a long run -----------------------------------------------------

LONG_RUN_CASES = int(os.environ.get("BENCH_LONG_RUN_CASES", "10000"))
# The engine before issue 10's hot-path work, measured in the same bench run.
BASELINE = os.environ.get("BENCH_BASELINE", "32f8f75")


def bench_long_run() -> None:
    """A 10,000-case run on a zero-latency simulator, with this code and with BASELINE's (a
    checkout of that commit on its own database, its own bench script), alternately: worker
    CPU per case, and worker memory sampled through the run (it must stay flat)."""
    rounds = int(os.environ.get("BENCH_CPU_ROUNDS", "1"))
    ours, theirs = [], []
    for _ in range(rounds):
        theirs.append(baseline_cpu_per_case())
        ours.append(long_run(LONG_RUN_CASES))
    report(
        f"worker CPU per case ({LONG_RUN_CASES:,} cases), this code",
        " / ".join(f"{v:.2f}" for v in ours) + " ms",
    )
    report(
        f"worker CPU per case, commit {BASELINE} (reference)",
        " / ".join(f"{v:.2f}" for v in theirs) + " ms",
    )
    report(
        "worker CPU per case, this code / reference",
        f"{statistics.median(ours) / statistics.median(theirs):.2f}",
        "<= 0.50",
    )


def long_run(cases: int) -> float:
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
        time.sleep(0.5)  # the sampling period, not a wait for a condition
    workers.stop()
    peak = max(rss for _, rss in samples)
    at = {q: next(rss for done, rss in samples if done >= q * cases) for q in (0.1, 0.5, 1.0)}
    report(
        "worker memory at 10 % / 50 % / 100 % of the run (peak)",
        " / ".join(f"{at[q]:.0f}" for q in (0.1, 0.5, 1.0)) + f" MiB ({peak:.0f})",
        "flat",
    )
    return 1000 * cpu / cases


def baseline_cpu_per_case() -> float:
    """BASELINE's own bench_long_run (see run_baseline_bench)."""
    printed = run_baseline_bench("long_run")
    match = re.search(r"worker CPU per case \([\d,]+ cases\): ([\d.]+) ms", printed)
    if not match:
        raise RuntimeError(f"the baseline bench printed no CPU figure:\n{printed}")
    return float(match.group(1))


def run_baseline_bench(only: str = "") -> str:
    """BASELINE's bench script, from a checkout of that commit, on a database of its own (its
    schema is its migrations'), with the same PostgreSQL, Redis and interpreter. Returns what
    it printed."""
    checkout = Path(tempfile.mkdtemp(prefix="pcr-baseline-"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", BASELINE], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(checkout)], input=archive, check=True)
    with connection.cursor() as cursor:
        cursor.execute("DROP DATABASE IF EXISTS bench_baseline WITH (FORCE)")
        cursor.execute("CREATE DATABASE bench_baseline")
    parts = urlsplit(os.environ["DATABASE_URL"])
    env = dict(os.environ, DATABASE_URL=urlunsplit(parts._replace(path="/bench_baseline")))
    env["BENCH_ONLY"] = only
    done = subprocess.run(
        [sys.executable, "bench/engine_bench.py"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    shutil.rmtree(checkout)
    return done.stdout


def main() -> None:
    call_command("migrate", verbosity=0)
    print(
        f"PostgreSQL {connection.pg_version / 10000:.0f}, {os.cpu_count()} CPUs; "
        f"{DURATION:.0f} s windows",
        flush=True,
    )
    only = os.environ.get("BENCH_ONLY", "")  # e.g. BENCH_ONLY=makespan
    if os.environ.get("BENCH_BEFORE"):  # first the whole table of BASELINE, for before/after
        print(f"commit {BASELINE}, its own bench:", flush=True)
        print(run_baseline_bench(only), flush=True)
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
