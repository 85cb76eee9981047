"""Report exports as a browser downloads them: CSV (streamed), JSON and JUnit XML."""

from __future__ import annotations

import csv
import io
import json
from xml.etree import ElementTree

import pytest
from django.urls import reverse

from testruns.engine import launching
from testruns.models import TestResult
from tests.test_pages import XSS, finish

pytestmark = pytest.mark.django_db


@pytest.fixture
def finished_run(launcher, make_card, simulator):
    card = make_card(cases=3)
    return finish(
        launching.launch_run(card=card, provider=simulator, user=launcher),
        ["passed", "failed", "error"],
    )


def download(client, user, name, run) -> tuple[str, str]:
    client.force_login(user)
    response = client.get(reverse(name, args=[run.pk]))
    assert response.status_code == 200
    body = b"".join(response.streaming_content) if response.streaming else response.content
    return response["Content-Disposition"], body.decode()


def test_csv_has_one_row_per_case_in_order_with_assertion_details(client, launcher, finished_run):
    disposition, text = download(client, launcher, "report-csv", finished_run)
    assert disposition == f'attachment; filename="run-{finished_run.pk}-greeting.csv"'
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["position"], r["case"], r["status"]) for r in rows] == [
        ("1", "case 0", "passed"),
        ("2", "case 1", "failed"),
        ("3", "case 2", "error"),
    ]
    assert rows[1]["assertions"] == "contains: fail (missing)"
    assert rows[0]["output"] == "ok 0" and json.loads(rows[0]["variables"]) == {"name": "N0"}


def test_csv_latency_is_read_to_a_tenth_of_a_millisecond(client, launcher, finished_run):
    finished_run.results.filter(position=0).update(latency_ms=123.456789012345)
    rows = list(
        csv.DictReader(io.StringIO(download(client, launcher, "report-csv", finished_run)[1]))
    )
    assert rows[0]["latency_ms"] == "123.5"


def test_csv_keeps_untrusted_text_and_defuses_spreadsheet_formulas(client, launcher, finished_run):
    TestResult.objects.filter(run=finished_run, position=0).update(output=XSS)
    TestResult.objects.filter(run=finished_run, position=1).update(output='=HYPERLINK("x")')
    _, text = download(client, launcher, "report-csv", finished_run)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["output"] == XSS
    assert rows[1]["output"] == '\'=HYPERLINK("x")'


def test_csv_of_a_large_run_streams_every_case(client, launcher, make_card, simulator):
    run = finish(
        launching.launch_run(card=make_card(cases=1200), provider=simulator, user=launcher),
        ["passed"] * 1200,
    )
    client.force_login(launcher)
    response = client.get(reverse("report-csv", args=[run.pk]))
    assert response.streaming
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert len(rows) == 1200 and rows[-1]["position"] == "1200"


def test_json_export_holds_the_run_and_every_result(client, launcher, finished_run):
    disposition, text = download(client, launcher, "report-json", finished_run)
    assert disposition.endswith(f'run-{finished_run.pk}-greeting.json"')
    document = json.loads(text)
    assert len(document["results"]) == 3


def test_junit_export_is_xml_with_failures_and_errors(client, launcher, finished_run):
    TestResult.objects.filter(run=finished_run, position=1).update(output="bad \x1b[31m" + XSS)
    _, text = download(client, launcher, "report-junit", finished_run)
    root = ElementTree.fromstring(text.encode())
    cases = root.findall(".//testcase")
    assert [c.get("name") for c in cases] == ["case 0", "case 1", "case 2"]
    assert cases[1].find("failure") is not None and cases[2].find("error") is not None
