"""Report, history, comparison and exports at size (issue 10). One run prints one table.

    .venv/bin/python -m project.stack exec -- .venv/bin/python bench/report_bench.py

Writes, with bulk_create, a card of 10,000 cases with two runs of 10,000 results each (the
report's run and its baseline, 5 % regressions and 2 % fixes between them) and 10,000 more
finished runs in history (20 cards, BENCH_HISTORY_CASES results each, default 3), then asks
the pages through Django's test client, signed in, BENCH_REQUESTS times each (after two
warm-up requests): p50/p95 of the wall time of a request (a download: until its last byte is
read), and the queries of one request. Beside each, the same page at 10 rows, measured in
the same run: a 10-result run and its baseline, a user who sees 10 runs. The live page's
shell (one run, no results) is the machine's floor.

Not a test: it asserts nothing. Everything it wrote is deleted at the end (the stack's
throwaway database goes anyway). Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import os
import random
import statistics
import time
import tracemalloc
from datetime import timedelta
from importlib import import_module

import django_env  # noqa: I001 (first: the settings and the path)

django_env.setup(ALLOWED_HOSTS="testserver", SECURE_SSL_REDIRECT="0")
ROOT = django_env.ROOT

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from testruns.catalog import cards
from testruns.models import PromptCard, Provider, TestCase, TestResult, TestRun

REQUESTS = int(os.environ.get("BENCH_REQUESTS", "20"))
BIG = int(os.environ.get("BENCH_ROWS", "10000"))
SMALL = 10
HISTORY_CARDS = 20
# Results per history run: what a trend computed from results (not stored) has to read.
HISTORY_CASES = int(os.environ.get("BENCH_HISTORY_CASES", "3"))
TAG = f"bench-report-{os.getpid()}"
STORED = any(field.name == "aggregated_at" for field in TestRun._meta.fields)


# --- Data -----------------------------------------------------------------------------------


def make_card(name: str, cases: int) -> PromptCard:
    card = PromptCard.objects.create(name=name, slug=f"{TAG}-{name}", template="Hi {{ name }}")
    TestCase.objects.bulk_create(
        TestCase(card=card, name=f"case {i}", variables={"name": f"N{i}"}, order=i)
        for i in range(cases)
    )
    cards.snapshot_version(card)
    return card


def make_runs(card, provider, user, finished: list, *, cases: int, failing=lambda i, p: False):
    """One finished run per time in `finished` (oldest first), `cases` results each; results
    of run i at position p fail when failing(i, p)."""
    version = card.versions.get()
    case_ids = list(card.cases.order_by("order").values_list("pk", flat=True)) or [None] * cases
    rng = random.Random(7)
    runs = TestRun.objects.bulk_create(
        TestRun(
            card=card,
            version=version,
            provider=provider,
            launched_by=user,
            status="succeeded",
            phase="done",
            total_cases=cases,
            done_count=cases,
        )
        for _ in finished
    )
    results = []
    for i, (run, at) in enumerate(zip(runs, finished, strict=True)):
        failed = 0
        for position in range(cases):
            fails = failing(i, position)
            failed += fails
            results.append(
                TestResult(
                    run=run,
                    case_id=case_ids[position % len(case_ids)],
                    position=position,
                    case_name=f"case {position}",
                    variables={"name": f"N{position}"},
                    assertions=[{"type": "contains", "value": f"N{position}"}],
                    status="failed" if fails else "passed",
                    prompt=f"Hi N{position}. " + "context " * 25,
                    output=f"Hello N{position}! " + "words " * 30,
                    assertion_results=[
                        {
                            "type": "contains",
                            "passed": not fails,
                            "score": 0.0 if fails else 1.0,
                            "reason": "missing" if fails else "found it",
                            "weight": 1.0,
                        }
                    ],
                    score=0.0 if fails else 1.0,
                    latency_ms=rng.lognormvariate(6, 0.4),
                    tokens_in=40,
                    tokens_out=60,
                    cost="0.000300",
                    attempts=1,
                    started_at=at,
                    finished_at=at,
                )
            )
            if len(results) >= 5000:
                TestResult.objects.bulk_create(results)
                results = []
        run.status = "failed" if failed else "succeeded"
        run.passed_count, run.failed_count = cases - failed, failed
        run.tokens_in, run.tokens_out = 40 * cases, 60 * cases
        run.queued_at, run.started_at, run.finished_at = at - timedelta(seconds=3), at, at
    TestResult.objects.bulk_create(results)
    TestRun.objects.bulk_update(
        runs,
        [
            "status",
            "passed_count",
            "failed_count",
            "tokens_in",
            "tokens_out",
            "queued_at",
            "started_at",
            "finished_at",
        ],
        batch_size=1000,
    )
    return runs


def store_aggregates() -> float:
    """What finishing does for each run (and 0008's backfill for older ones): seconds."""
    if not STORED:
        return 0.0
    backfill = import_module("testruns.migrations.0008_run_aggregates").BACKFILL
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(backfill)
    return time.perf_counter() - started


def build() -> dict:
    users = get_user_model().objects
    viewer = users.create_user(f"{TAG}-viewer", password="bench-viewer-password-1")
    viewer.user_permissions.add(Permission.objects.get(codename="view_testrun"))
    small_user = users.create_user(f"{TAG}-small", password="bench-small-password-1")
    provider = Provider.objects.create(name=f"{TAG}-sim", kind="simulator", model="sim")
    now = timezone.now()
    started = time.perf_counter()

    history_cards = [make_card(f"history-{i}", 0) for i in range(HISTORY_CARDS)]
    per_card = BIG // HISTORY_CARDS
    for n, card in enumerate(history_cards):
        start = now - timedelta(days=30)
        times = [start + timedelta(seconds=HISTORY_CARDS * i + n) for i in range(per_card)]
        make_runs(
            card,
            provider,
            viewer,
            times,
            cases=HISTORY_CASES,
            failing=lambda i, p: (i + p) % 7 == 0,
        )

    def changed(i: int, position: int) -> bool:
        # The baseline (run 0) fails 2 % of cases, the run 5 % others: regressions and fixes.
        return position % 50 == 0 if i == 0 else position % 20 == 1

    big_card = make_card("big", BIG)
    big_times = [now - timedelta(hours=2), now - timedelta(hours=1)]
    big_baseline, big_run = make_runs(
        big_card, provider, viewer, big_times, cases=BIG, failing=changed
    )
    small_card = make_card("small", SMALL)
    small_runs = make_runs(
        small_card,
        provider,
        small_user,
        [now - timedelta(minutes=SMALL - i) for i in range(SMALL)],
        cases=SMALL,
        # The last two runs as the big pair: the report's baseline, then the run.
        failing=lambda i, position: changed(0 if i == SMALL - 2 else 1, position),
    )
    created = time.perf_counter() - started
    aggregated = store_aggregates()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE testruns_testrun; ANALYZE testruns_testresult")
    return {
        "viewer": viewer,
        "small_user": small_user,
        "big": (big_baseline, big_run),
        "small": (small_runs[-2], small_runs[-1]),
        "created_seconds": created,
        "aggregate_seconds": aggregated,
        "runs": TestRun.objects.filter(card__slug__startswith=TAG).count(),
        "results": TestResult.objects.filter(run__card__slug__startswith=TAG).count(),
    }


def clean_up() -> None:
    runs = TestRun.objects.filter(card__slug__startswith=TAG)
    TestResult.objects.filter(run__in=runs).delete()
    runs.delete()
    PromptCard.objects.filter(slug__startswith=TAG).delete()
    Provider.objects.filter(name__startswith=TAG).delete()
    get_user_model().objects.filter(username__startswith=TAG).delete()


# --- Measuring ------------------------------------------------------------------------------


def fetch(client: Client, url: str) -> int:
    response = client.get(url)
    if response.status_code != 200:
        raise SystemExit(f"{url}: HTTP {response.status_code}")
    if response.streaming:
        return sum(len(chunk) for chunk in response.streaming_content)
    return len(response.content)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(client: Client, url: str) -> dict:
    for _ in range(2):
        size = fetch(client, url)
    times = []
    for _ in range(REQUESTS):
        started = time.perf_counter()
        fetch(client, url)
        times.append((time.perf_counter() - started) * 1000)
    with CaptureQueriesContext(connection) as captured:
        fetch(client, url)
    return {
        "p50": statistics.median(times),
        "p95": percentile(times, 0.95),
        "queries": len(captured),
        "bytes": size,
    }


def peak_memory(client: Client, url: str) -> float:
    """Peak Python memory (MiB) allocated while one download is answered and read."""
    tracemalloc.start()
    try:
        fetch(client, url)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def main() -> None:
    call_command("migrate", verbosity=0)
    print(f"PostgreSQL {connection.pg_version / 10000:.0f}, {os.cpu_count()} CPUs", flush=True)
    try:
        data = build()
        print(
            f"wrote {data['runs']:,} runs and {data['results']:,} results in "
            f"{data['created_seconds']:.1f} s; stored aggregates of every run in "
            f"{data['aggregate_seconds']:.2f} s (one statement, as migration 0008)",
            flush=True,
        )
        viewer, small_user = Client(), Client()
        viewer.force_login(data["viewer"])
        small_user.force_login(data["small_user"])
        (big_base, big), (small_base, small) = data["big"], data["small"]
        pairs = {
            "report, page 1": (
                (viewer, reverse("report", args=[big.pk])),
                (viewer, reverse("report", args=[small.pk])),
            ),
            "report, last page": (
                (viewer, reverse("report", args=[big.pk]) + f"?page={BIG // 50}"),
                (viewer, reverse("report", args=[small.pk])),
            ),
            "history": (
                (viewer, reverse("history")),
                (small_user, reverse("history")),
            ),
            "comparison, all cases": (
                (viewer, reverse("compare") + f"?runs={big_base.pk},{big.pk}"),
                (viewer, reverse("compare") + f"?runs={small_base.pk},{small.pk}"),
            ),
            "comparison, differences only": (
                (viewer, reverse("compare") + f"?runs={big_base.pk},{big.pk}&diff=1"),
                (viewer, reverse("compare") + f"?runs={small_base.pk},{small.pk}&diff=1"),
            ),
            "CSV export": (
                (viewer, reverse("report-csv", args=[big.pk])),
                (viewer, reverse("report-csv", args=[small.pk])),
            ),
            "JSON export": (
                (viewer, reverse("report-json", args=[big.pk])),
                (viewer, reverse("report-json", args=[small.pk])),
            ),
        }
        floor = measure(viewer, reverse("run-detail", args=[small.pk]))
        rows = []
        for name, ((client, url), (ref_client, ref_url)) in pairs.items():
            print(f"{name}...", flush=True)
            rows.append((name, measure(client, url), measure(ref_client, ref_url)))
        memory = {
            name: peak_memory(viewer, reverse(name, args=[big.pk]))
            for name in ("report-csv", "report-json")
        }
    finally:
        clean_up()

    print(
        f"\n{REQUESTS} requests each; at size: {BIG:,} results (report, comparison of two "
        f"runs, exports) or {data['runs']:,} runs of {HISTORY_CASES} results (history); "
        f"reference: the same page at {SMALL} rows\n"
    )
    print("| page | p50 ms | p95 ms | queries | reference p50 ms | reference queries | p50 ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, at_size, ref in rows:
        print(
            f"| {name} | {at_size['p50']:.1f} | {at_size['p95']:.1f} | {at_size['queries']} "
            f"| {ref['p50']:.1f} | {ref['queries']} | {at_size['p50'] / ref['p50']:.1f}x |"
        )
    print(
        f"| live page shell (floor) | {floor['p50']:.1f} | {floor['p95']:.1f} "
        f"| {floor['queries']} | | | |"
    )
    sizes = {name: at_size["bytes"] for name, at_size, _ in rows}
    print(
        f"\nexport bodies: CSV {sizes['CSV export'] / 2**20:.1f} MiB, JSON "
        f"{sizes['JSON export'] / 2**20:.1f} MiB; peak Python memory while one is answered "
        f"and read: CSV {memory['report-csv']:.1f} MiB, JSON {memory['report-json']:.1f} MiB"
    )


if __name__ == "__main__":
    main()
