"""A run's admin page at size: a run of 10,000 results opens with the same queries as one of
10, and shows one page of results, never all of them (each used to be an inline row)."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from testruns.admin.runs import RESULTS_PER_PAGE
from testruns.models import TestResult, TestRun

pytestmark = pytest.mark.django_db

ROW = re.compile(r'<tr class="form-row[^"]*"\s+id="results-\d+"')


@pytest.fixture
def admin_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("root", password="root-pw-1"))
    return client


def run_with_results(card, provider, count: int, *, failing_every: int = 10) -> TestRun:
    """A finished run with `count` results, written in bulk; every `failing_every`th failed."""
    run = TestRun.objects.create(
        card=card,
        version=card.versions.get(),
        provider=provider,
        status=TestRun.Status.FAILED,
        total_cases=count,
        done_count=count,
        passed_count=count - count // failing_every,
        failed_count=count // failing_every,
        cost=Decimal("0.000123") * count,
    )
    TestResult.objects.bulk_create(
        TestResult(
            run=run,
            position=i,
            case_name=f"case {i}",
            status="failed" if i % failing_every == failing_every - 1 else "passed",
            output=f"output {i} " + "x" * 500,
            latency_ms=100 + i % 50,
            tokens_in=10,
            tokens_out=5,
            cost=Decimal("0.000123"),
            attempts=1,
        )
        for i in range(count)
    )
    return run


def open_change_page(client, run: TestRun, **query) -> tuple[str, int]:
    url = reverse("admin:testruns_testrun_change", args=[run.pk])
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url, query)
    assert response.status_code == 200
    return response.content.decode(), len(queries)


def test_a_run_of_10000_results_opens_with_the_queries_of_a_run_of_10(
    admin_client, make_card, simulator
):
    card = make_card(cases=1)
    small = run_with_results(card, simulator, 10)
    large = run_with_results(card, simulator, 10_000)
    open_change_page(admin_client, small)  # the session and content types, read once

    small_page, small_queries = open_change_page(admin_client, small)
    large_page, large_queries = open_change_page(admin_client, large)

    assert large_queries == small_queries
    assert len(ROW.findall(small_page)) == 10
    assert len(ROW.findall(large_page)) == RESULTS_PER_PAGE
    assert "Results 1–50 of 10000" in large_page
    # The figures are the report's, with the currency spelt out.
    assert "Pass rate <strong>90 %</strong>" in large_page
    assert "$1.230000" in large_page and "<p>0.000123</p>" not in large_page
    assert reverse("report", args=[large.pk]) in large_page
    # 10,000 rows of 500 characters were 5 MB and more; a page of 50 is a small fraction.
    assert len(large_page) < 200_000


def test_the_results_are_paged_and_can_show_only_the_failing_ones(
    admin_client, make_card, simulator
):
    run = run_with_results(make_card(cases=1), simulator, 1_000)

    last, _ = open_change_page(admin_client, run, results_page=20)
    failing, _ = open_change_page(admin_client, run, failing=1, results_page=2)
    beyond, _ = open_change_page(admin_client, run, results_page=999)

    assert "Results 951–1000 of 1000" in last and "case 999" in last and "case 949" not in last
    assert "Failing results 51–100 of 100" in failing
    shown = {int(n) for n in re.findall(r'field-case_name">\s*<p>case (\d+)<', failing)}
    assert shown == {i for i in range(509, 1000, 10)}
    assert "Results 951–1000 of 1000" in beyond  # past the end: the last page


def test_outputs_are_clipped_and_escaped_in_the_admin(admin_client, make_card, simulator):
    run = run_with_results(make_card(cases=1), simulator, 1)
    TestResult.objects.filter(run=run).update(output="<script>x()</script>" + "y" * 1000)
    page, _ = open_change_page(admin_client, run)
    assert "<script>x()</script>" not in page and "&lt;script&gt;x()&lt;/script&gt;" in page
    assert "y" * 270 in page and "y" * 300 not in page
