"""Reports, history and comparison at size (issue 10): a finished run's aggregates are stored
once and match its results; the pages issue as many queries for 60 rows as for 3; exports
stream and say exactly what they said before. (The timings are bench/report_bench.py's.)"""

from __future__ import annotations

import csv
import importlib
import io
import json
import urllib.request
from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from django.http import JsonResponse
from django.test import AsyncClient
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from testruns.engine import launching
from testruns.engine.run_aggregates import store_run_aggregates
from testruns.models import TestCase, TestResult, TestRun
from testruns.reporting import formats, history, run_csv
from testruns.reporting.formats import run_json, run_json_text
from tests.conftest import run_in_this_thread
from tests.test_pages import XSS, finish

pytestmark = pytest.mark.django_db


def percentile_cont(values: list[float], fraction: float) -> float | None:
    """PostgreSQL's percentile_cont: linear interpolation between the closest ranks."""
    values = sorted(values)
    if not values:
        return None
    rank = fraction * (len(values) - 1)
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def expected_aggregates(run: TestRun) -> dict:
    latencies = list(run.results.exclude(latency_ms=None).values_list("latency_ms", flat=True))
    return {
        "latency_p50_ms": percentile_cont(latencies, 0.5),
        "latency_p95_ms": percentile_cont(latencies, 0.95),
        "skipped_count": run.results.filter(status="skipped").count(),
    }


def stored_aggregates(run: TestRun) -> dict:
    run.refresh_from_db()
    return {name: getattr(run, name) for name in ("latency_p50_ms", "latency_p95_ms")} | {
        "skipped_count": run.skipped_count
    }


# --- Stored aggregates ----------------------------------------------------------------------


def test_a_run_stores_its_aggregates_when_it_finishes_and_they_match_its_results(
    launcher, make_card, simulator
):
    simulator.parameters = {"latency_ms": 2, "jitter_ms": 20, "error_rate": 0}
    simulator.save()
    card = make_card(cases=6)
    # The third case fails and stops the run: three cases are skipped, without a latency.
    TestCase.objects.filter(card=card, name="case 2").update(
        assertions=[{"type": "contains", "value": "not in any answer"}]
    )
    run = launching.launch_run(
        card=card, provider=simulator, user=launcher, stop_on_failure=True, max_concurrent_tests=1
    )
    run = run_in_this_thread(run)
    assert run.status == "failed" and run.aggregated_at is not None
    assert stored_aggregates(run) == pytest.approx(expected_aggregates(run))
    assert run.skipped_count == 3 and run.latency_p50_ms is not None
    # The report's figures from the row are those computed from the results.
    assert history.run_statistics(run) == pytest.approx(history._live_statistics(run))


def test_a_run_still_going_stores_nothing(launcher, make_card, simulator):
    run = launching.launch_run(card=make_card(), provider=simulator, user=launcher)
    assert store_run_aggregates(run.pk) is None
    run.refresh_from_db()
    assert run.aggregated_at is None


def test_the_report_stores_the_aggregates_of_a_run_finished_without_them(
    client, launcher, make_card, simulator
):
    run = finish(
        launching.launch_run(card=make_card(cases=5), provider=simulator, user=launcher),
        ["passed", "failed", "skipped", "passed", "error"],
    )
    TestResult.objects.filter(run=run, status="skipped").update(latency_ms=None)
    assert run.aggregated_at is None
    client.force_login(launcher)
    first = client.get(reverse("report", args=[run.pk])).context["stats"]
    assert stored_aggregates(run) == pytest.approx(expected_aggregates(run))
    assert run.aggregated_at is not None
    second = client.get(reverse("report", args=[run.pk])).context["stats"]
    assert first == second
    assert (second["passed"], second["evaluated"], second["skipped"]) == (2, 4, 1)


def test_the_migration_backfills_runs_finished_before_it(launcher, make_card, simulator):
    card = make_card(cases=4)
    done = finish(
        launching.launch_run(card=card, provider=simulator, user=launcher),
        ["passed", "failed", "passed", "skipped"],
        latency=40,
    )
    going = launching.launch_run(card=card, provider=simulator, user=launcher)
    migration = importlib.import_module("testruns.migrations.0008_run_aggregates")
    with connection.cursor() as cursor:
        cursor.execute(migration.BACKFILL)
    assert stored_aggregates(done) == pytest.approx(expected_aggregates(done))
    assert done.aggregated_at is not None and done.skipped_count == 1
    going.refresh_from_db()
    assert going.aggregated_at is None


# --- Constant queries per page --------------------------------------------------------------


def make_finished_runs(card, provider, user, *, runs: int, cases: int) -> list[TestRun]:
    """`runs` finished runs of `cases` results each, written in bulk, ten seconds apart."""
    version = card.versions.get()
    now = timezone.now()
    made = TestRun.objects.bulk_create(
        TestRun(
            card=card,
            version=version,
            provider=provider,
            launched_by=user,
            status="failed" if i % 3 == 0 else "succeeded",
            phase="done",
            total_cases=cases,
            done_count=cases,
            passed_count=cases - 1 if i % 3 == 0 else cases,
            failed_count=1 if i % 3 == 0 else 0,
        )
        for i in range(runs)
    )
    for i, run in enumerate(made):
        finished = now - timedelta(seconds=10 * (runs - i))
        TestRun.objects.filter(pk=run.pk).update(
            queued_at=finished - timedelta(seconds=5),
            started_at=finished - timedelta(seconds=4),
            finished_at=finished,
        )
    TestResult.objects.bulk_create(
        TestResult(
            run=run,
            position=position,
            case_name=f"case {position}",
            status="failed" if position == i % cases and i % 3 == 0 else "passed",
            output=f"output {position}",
            latency_ms=100 + position,
            assertion_results=[{"type": "contains", "passed": True, "reason": "ok"}],
            finished_at=now,
        )
        for i, run in enumerate(made)
        for position in range(cases)
    )
    return made


def queries(client, url: str, params: dict | None = None) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url, params or {})
    assert response.status_code == 200
    return len(captured)


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "first-view"])
def test_the_report_costs_as_many_queries_for_60_cases_as_for_3(
    client, launcher, make_card, simulator, stored
):
    counts = []
    for cases in (3, 60):
        card = make_card(f"card-{cases}", cases=0)
        baseline, run = make_finished_runs(card, simulator, launcher, runs=2, cases=cases)
        if stored:
            for each in (baseline, run):
                store_run_aggregates(each.pk)
        client.force_login(launcher)
        url = reverse("report", args=[run.pk])
        counts.append(queries(client, url))
        # Later pages and the status filter cost the same too.
        counts.append(queries(client, url, {"page": 2 if cases > 50 else 1, "status": "passed"}))
    assert counts[0] == counts[2] and counts[1] == counts[3]


def test_the_history_costs_as_many_queries_for_60_runs_as_for_3(
    client, launcher, make_card, simulator
):
    counts = []
    for runs in (3, 60):
        TestRun.objects.all().delete()
        for slug in ("one", "two"):
            card = make_card(f"{slug}-{runs}", cases=0)
            for run in make_finished_runs(card, simulator, launcher, runs=runs, cases=2):
                if run.pk % 2:  # half stored, half computed by the page
                    store_run_aggregates(run.pk)
        client.force_login(launcher)
        counts.append(queries(client, reverse("history")))
        counts.append(queries(client, reverse("history"), {"page": 2, "status": "succeeded"}))
    assert counts[0] == counts[2] and counts[1] == counts[3]


def test_the_comparison_costs_as_many_queries_for_60_cases_as_for_3(
    client, launcher, make_card, simulator
):
    counts = []
    for cases in (3, 60):
        card = make_card(f"compare-{cases}", cases=0)
        runs = make_finished_runs(card, simulator, launcher, runs=3, cases=cases)
        client.force_login(launcher)
        ids = ",".join(str(run.pk) for run in runs)
        counts.append(queries(client, reverse("compare"), {"runs": ids}))
        counts.append(queries(client, reverse("compare"), {"runs": ids, "diff": "1"}))
    assert counts[0] == counts[2] and counts[1] == counts[3]


def test_comparison_pages_line_up_and_show_only_differences(client, launcher, make_card, simulator):
    card = make_card("lined-up", cases=0)
    runs = make_finished_runs(card, simulator, launcher, runs=3, cases=60)
    # The first run failed case 0; the others passed all. One case is missing from the last.
    TestResult.objects.filter(run=runs[2], position=59).delete()
    client.force_login(launcher)
    ids = ",".join(str(run.pk) for run in runs)
    every = client.get(reverse("compare"), {"runs": ids, "page": 2}).context["page"]
    assert every.paginator.count == 60
    assert [row["position"] for row in every] == list(range(50, 60))
    assert [cell is None for cell in every[-1]["cells"]] == [False, False, True]
    beyond = client.get(reverse("compare"), {"runs": ids, "page": 99}).context["page"]
    assert beyond.number == 2 and len(beyond) == 10  # the last page, as Paginator.get_page
    diff = client.get(reverse("compare"), {"runs": ids, "diff": "1"}).context["page"]
    assert [(row["case_name"], row["statuses"]) for row in diff] == [
        ("case 0", ["failed", "passed", "passed"]),
        ("case 59", ["passed", "passed", None]),
    ]


def test_report_counts_every_change_and_marks_those_on_the_page(
    client, launcher, make_card, simulator
):
    card = make_card("changes", cases=0)
    baseline, run = make_finished_runs(card, simulator, launcher, runs=2, cases=120)
    TestResult.objects.filter(run=run, position__gte=60).update(status="failed")
    TestResult.objects.filter(run=baseline, position__lt=2).update(status="failed")
    client.force_login(launcher)
    response = client.get(reverse("report", args=[run.pk]), {"page": 2})
    changes = response.context["changes"]
    assert (changes["regression_count"], changes["fix_count"]) == (60, 2)
    assert len(changes["regressions"]) == 50 and changes["regressions"][0].position == 60
    marks = {result.position: mark for result, mark, _, _ in response.context["rows"]}
    assert {p for p, mark in marks.items() if mark == "regression"} == set(range(60, 100))
    assert "60 regressions" in response.content.decode()


# --- Streamed exports -----------------------------------------------------------------------


@pytest.fixture
def exported_run(launcher, make_card, simulator):
    run = finish(
        launching.launch_run(card=make_card(cases=120), provider=simulator, user=launcher),
        ["passed", "failed", "error", "skipped"] * 30,
    )
    TestResult.objects.filter(run=run, position=1).update(
        output=XSS + ' ünïcode \u2028 "quoted"\nline', variables={"name": "=1+1", "n": [1, 2]}
    )
    return run


def csv_as_before(run: TestRun) -> bytes:
    """The CSV export as it was written before it streamed by plain rows: from instances."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(run_csv.CSV_COLUMNS)
    for r in run.results.order_by("position"):
        assertions = run_csv.assertion_summary(r.assertion_results)
        values = (
            r.position + 1, r.case_name, r.status, r.score, r.latency_ms, r.tokens_in,
            r.tokens_out, r.cost, r.attempts, r.retries, r.cached, assertions, r.error, r.output,
            json.dumps(r.variables, ensure_ascii=False), "", "",
        )  # fmt: skip
        writer.writerow([run_csv._cell(v) for v in values])
    return buffer.getvalue().encode()


def json_as_before(run: TestRun) -> bytes:
    """The JSON export as it was before it streamed: the whole document, from instances."""
    document = formats.run_summary(run) | {
        "results": [
            {field: formats._plain(getattr(r, field)) for field in formats.RESULT_FIELDS}
            | {"review": None}
            for r in run.results.order_by("position")
        ]
    }
    return JsonResponse(document, json_dumps_params={"indent": 2}).content


def body(response) -> bytes:
    assert response.status_code == 200 and response.streaming
    return b"".join(response.streaming_content)


def test_csv_export_streams_the_same_bytes(client, launcher, exported_run):
    client.force_login(launcher)
    response = client.get(reverse("report-csv", args=[exported_run.pk]))
    assert response["Content-Type"] == "text/csv"
    assert body(response) == csv_as_before(exported_run)


def test_json_export_streams_what_the_whole_document_said(client, launcher, exported_run):
    store_run_aggregates(exported_run.pk)
    client.force_login(launcher)
    response = client.get(reverse("report-json", args=[exported_run.pk]))
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"].endswith(f'run-{exported_run.pk}-greeting.json"')
    streamed = body(response)
    assert streamed == json_as_before(exported_run)
    assert json.loads(streamed) == run_json(exported_run)  # the CLI's and the API's document
    assert len(json.loads(streamed)["results"]) == 120


def test_json_text_of_a_run_without_results_is_the_whole_document(launcher, make_card, simulator):
    run = finish(
        launching.launch_run(card=make_card(cases=1), provider=simulator, user=launcher),
        ["passed"],
    )
    TestResult.objects.filter(run=run).delete()
    assert "".join(run_json_text(run)).encode() == json_as_before(run)


def test_exports_under_asgi_stream_through_an_async_iterator(launcher, exported_run):
    """Under ASGI Django would read a synchronous iterator whole before sending a byte."""
    client = AsyncClient()
    client.force_login(launcher)

    async def download(name: str) -> tuple[bool, bytes]:
        response = await client.get(reverse(name, args=[exported_run.pk]))
        chunks = [chunk async for chunk in response.streaming_content]
        return response.is_async, b"".join(chunks)

    is_async, csv_bytes = async_to_sync(download)("report-csv")
    assert is_async and csv_bytes == csv_as_before(exported_run)
    is_async, json_bytes = async_to_sync(download)("report-json")
    assert is_async and json.loads(json_bytes)["run"]["id"] == exported_run.pk


@pytest.mark.django_db(transaction=True)
def test_exports_through_daphne_say_the_same(
    asgi_server, session_cookie, launcher, make_card, simulator
):
    """The real ASGI server: results read a chunk at a time in the request's thread."""
    run = finish(
        launching.launch_run(card=make_card(cases=1200), provider=simulator, user=launcher),
        ["passed", "failed"] * 600,
    )
    for name, expected in (("report-csv", csv_as_before), ("report-json", json_as_before)):
        request = urllib.request.Request(
            f"http://{asgi_server}{reverse(name, args=[run.pk])}",
            headers={"Cookie": session_cookie},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200 and response.headers["Content-Length"] is None
            assert response.read() == expected(run), name


def test_statistics_of_a_finished_run_keep_their_types(launcher, make_card, simulator):
    run = finish(
        launching.launch_run(card=make_card(cases=2), provider=simulator, user=launcher),
        ["passed", "passed"],
    )
    live = history._live_statistics(run)
    stored = history.run_statistics(run)
    assert stored == pytest.approx(live)
    assert isinstance(stored["cost"], Decimal) and isinstance(stored["tokens_in"], int)
