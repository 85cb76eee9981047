"""Comparison that compares (issue 12): "differences only" means any difference in verdict,
output or assertion outcomes; each cell shows a word diff of its output against the first
column, its assertion outcomes and its latency and cost deltas; runs of different versions
show the prompt diff; runs are picked with the history's checkboxes."""

from __future__ import annotations

import re
import time
from decimal import Decimal

import pytest
from django.urls import reverse

from testruns.catalog.cards import save_card
from testruns.engine import launching
from testruns.models import TestResult
from testruns.reporting.text_diff import line_diff, word_diff
from tests.test_pages import XSS, finish

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_runs(client, launcher, make_card, simulator):
    """Two finished runs of one card, alike in every case: same verdicts, outputs, outcomes."""
    card = make_card(cases=3)
    runs = [
        finish(launching.launch_run(card=card, provider=simulator, user=launcher), ["passed"] * 3)
        for _ in range(2)
    ]
    client.force_login(launcher)
    return runs


def compare(client, runs, **params):
    ids = ",".join(str(run.pk) for run in runs)
    response = client.get(reverse("compare"), {"runs": ids, **params})
    assert response.status_code == 200
    return response


def shown_cases(client, runs) -> list[tuple[str, list[str]]]:
    page = compare(client, runs, diff="1").context["page"]
    return [(row["case_name"], row["what"]) for row in page]


# --- Differences only ------------------------------------------------------------------------


def test_differences_only_shows_nothing_for_identical_runs(client, two_runs):
    response = compare(client, two_runs, diff="1")
    assert list(response.context["page"]) == []
    assert "No differences" in response.content.decode()


def test_differences_only_catches_an_output_that_differs_with_the_same_verdict(client, two_runs):
    TestResult.objects.filter(run=two_runs[1], position=1).update(output="a different answer")
    assert shown_cases(client, two_runs) == [("case 1", ["output"])]


def test_differences_only_catches_an_error_that_differs(client, two_runs):
    TestResult.objects.filter(run=two_runs[0], position=2).update(status="error", error="429")
    TestResult.objects.filter(run=two_runs[1], position=2).update(status="error", error="500")
    assert shown_cases(client, two_runs) == [("case 2", ["output"])]


def test_differences_only_catches_assertion_outcomes_that_differ_with_the_same_verdict(
    client, two_runs
):
    # Same status, same output: only the grader's reason for one assertion changed.
    result = TestResult.objects.get(run=two_runs[1], position=0)
    result.assertion_results = [{**result.assertion_results[0], "reason": "found it twice"}]
    result.save()
    assert shown_cases(client, two_runs) == [("case 0", ["assertions"])]
    row = compare(client, two_runs, diff="1").context["page"][0]
    first, second = row["columns"]
    assert [o["changed"] for o in first["outcomes"]] == [False]
    assert [(o["reason"], o["changed"]) for o in second["outcomes"]] == [("found it twice", True)]


def test_differences_only_still_catches_verdicts_and_missing_cases(client, two_runs):
    TestResult.objects.filter(run=two_runs[1], position=0).update(status="failed")
    TestResult.objects.filter(run=two_runs[1], position=2).delete()
    assert shown_cases(client, two_runs) == [("case 0", ["verdict"]), ("case 2", ["missing"])]


# --- A cell against the first column --------------------------------------------------------


def test_outputs_are_word_diffs_against_the_first_column(client, two_runs):
    TestResult.objects.filter(run=two_runs[0], position=0).update(output="The refund takes 5 days")
    TestResult.objects.filter(run=two_runs[1], position=0).update(output="The refund takes 7 days")
    response = compare(client, two_runs)
    first, second = response.context["page"][0]["columns"]
    assert first["reference"] and not first["changed"]
    assert str(first["text"]) == "The refund takes 5 days"
    assert (
        second["changed"]
        and str(second["text"]) == "The refund takes <del>5</del><ins>7</ins> days"
    )
    assert "The refund takes <del>5</del><ins>7</ins> days" in response.content.decode()


def test_the_word_diff_escapes_model_output(client, two_runs):
    TestResult.objects.filter(run=two_runs[0], position=0).update(output="safe answer")
    TestResult.objects.filter(run=two_runs[1], position=0).update(output=f"safe {XSS} answer")
    TestResult.objects.filter(run=two_runs[1], position=1).update(error=XSS, status="error")
    html = compare(client, two_runs).content.decode()
    assert "<script>window.__xss" not in html and "<img src=x" not in html
    assert "safe <ins>&lt;script&gt;window.__xss=1&lt;/script&gt;" in html
    # Nothing but <ins> and <del> as markup inside the outputs.
    outputs = re.findall(r'<pre class="output[^"]*" data-role="output">(.*?)</pre>', html, re.S)
    tags = {tag for output in outputs for tag in re.findall(r"</?([a-z]+)", output)}
    assert tags <= {"ins", "del", "span"}


def test_latency_and_cost_show_as_deltas_against_the_first_column(client, two_runs):
    TestResult.objects.filter(run=two_runs[0], position=0).update(
        latency_ms=100, cost=Decimal("0.001")
    )
    TestResult.objects.filter(run=two_runs[1], position=0).update(
        latency_ms=1350, cost=Decimal("0.0004")
    )
    response = compare(client, two_runs)
    first, second = response.context["page"][0]["columns"]
    assert (first["latency_label"], first["cost_label"]) == ("", "")
    assert second["latency_delta"] == 1250 and second["latency_label"] == "+1,250 ms"
    assert second["cost_delta"] == Decimal("-0.0006") and second["cost_label"] == "−$0.000600"
    html = response.content.decode()
    assert '<span class="delta worse" data-role="latency-delta">+1,250 ms</span>' in html
    assert '<span class="delta better" data-role="cost-delta">−$0.000600</span>' in html
    same = response.context["page"][1]["columns"][1]
    assert (same["latency_label"], same["cost_label"]) == ("±0 ms", "±$0")


def test_a_case_missing_from_the_first_run_is_compared_with_the_next(client, two_runs):
    TestResult.objects.filter(run=two_runs[0], position=2).delete()
    row = compare(client, two_runs).context["page"][2]
    assert row["columns"][0] is None and row["columns"][1]["reference"]


# --- Prompt diff ----------------------------------------------------------------------------


def test_runs_of_two_versions_show_the_prompt_diff_at_the_top(
    client, launcher, make_card, simulator
):
    card = make_card(cases=1, system_prompt="Be brief.", template="Say hello to {{ name }}.")
    old = finish(launching.launch_run(card=card, provider=simulator, user=launcher), ["passed"])
    card.template = "Say a warm hello to {{ name }}."
    save_card(card, user=launcher, note="warmer")
    new = finish(launching.launch_run(card=card, provider=simulator, user=launcher), ["passed"])
    assert (old.version.number, new.version.number) == (1, 2)
    client.force_login(launcher)

    response = compare(client, [old, new])
    [change] = response.context["prompt_changes"]
    assert (change["base"], change["version"]) == (old.version, new.version)
    assert not change["system_prompt"].changed
    html = response.content.decode()
    assert html.index('id="prompt-diff"') < html.index('id="compare-table"')
    assert "Say <ins>a warm </ins>hello to {{ name }}." in html
    assert reverse("version", args=[card.pk, 2]) in html
    assert compare(client, [new, new]).context["prompt_changes"] == []
    assert 'id="prompt-diff"' not in compare(client, [old]).content.decode()


def test_word_and_line_diffs_escape_and_give_the_text_back():
    diff = word_diff("<b>bold</b> text", "<i>bold</i> text")
    assert (
        str(diff.html)
        == "&lt;<del>b</del><ins>i</ins>&gt;bold&lt;/<del>b</del><ins>i</ins>&gt; text"
    )
    assert not word_diff("same", "same").changed and word_diff("a", "b").changed
    lines = line_diff("one\ntwo\nthree\n", "one\n2 & two\nthree\nfour\n")
    assert str(lines.html) == "one\n<ins>2 &amp; </ins>two\nthree\n<ins>four\n</ins>"
    # Stripped of its markup, the diff is the new text (escaped) with the old words in <del>.
    old, new = (
        "Refunds within 30 days.\nNo receipts.",
        "Refunds within 14 days.\n\nReceipts needed.",
    )
    html = str(word_diff(old, new).html)
    assert re.sub(r"<del[^>]*>.*?</del>|<[^>]+>", "", html, flags=re.S) == new


def test_a_degenerate_output_diffs_quickly():
    looped = " ".join(["."] * 4000)
    started = time.monotonic()
    word_diff(looped, " ".join([","] * 2000 + ["."] * 2000))
    assert time.monotonic() - started < 1


# --- Picking runs ---------------------------------------------------------------------------


def test_history_has_a_checkbox_per_run_and_compare_selected(client, two_runs):
    card = two_runs[0].card
    for params in ({}, {"card": card.pk}):
        html = client.get(reverse("history"), params).content.decode()
        assert '<form method="get" action="/compare/" id="compare-form"' in html
        assert 'id="compare-selected">Compare selected</button>' in html
        for run in two_runs:
            assert f'name="runs" value="{run.pk}" form="compare-form"' in html


def test_compare_selected_leads_to_the_comparison_oldest_first(client, two_runs):
    one, two = two_runs
    # What the history's form sends: the ticked boxes, newest first as the history lists them.
    response = client.get(reverse("compare"), {"runs": [two.pk, one.pk], "diff": "1"})
    assert response.status_code == 302
    assert response["Location"] == f"/compare/?runs={one.pk},{two.pk}&diff=1"
    page = client.get(response["Location"])
    assert [run.pk for run in page.context["runs"]] == [one.pk, two.pk]
    assert page.context["differences_only"]


def test_the_comparison_without_runs_leads_to_the_history(client, launcher):
    client.force_login(launcher)
    html = client.get(reverse("compare")).content.decode()
    assert "?runs=12,15" not in html
    assert 'href="/history/"' in html and "Compare selected" in html
    assert 'id="toggle-diff"' not in html


def test_a_comparison_of_one_card_offers_that_cards_runs_to_pick_from(client, two_runs):
    html = compare(client, two_runs[:1]).content.decode()
    assert f'id="pick-runs" href="/history/?card={two_runs[0].card_id}"' in html
    assert 'id="compare-one"' in html
