"""Reading results in a real browser (issue 12): a case expands on the report to show what was
sent and what came back, every repeat with its own verdict, and its retries apart; the live
page shows the same detail and counts progress in model calls while a run with repeats goes
on. Playwright drives Debian's chromium against daphne and real worker processes."""

from __future__ import annotations

import re

import pytest

from testruns.engine import launching
from testruns.models import Provider
from tests.browser import XSS, log_in, screenshot
from tests.conftest import run_in_this_thread
from tests.fake_llm import FakeReply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]


def test_a_case_expands_on_the_report_to_everything_it_sent_and_got(
    context, expect, launcher, make_card, fake_llm
):
    provider = Provider.objects.create(
        name="Fake vendor", kind="openai", model="m", base_url=fake_llm.base_url
    )
    card = make_card("detail", cases=1, system_prompt="You greet {{ name }}.")
    run = launching.launch_run(
        card=card, provider=provider, user=launcher, repeats=2, max_retries=1
    )
    fake_llm.script([FakeReply(text=f"Hello N0 {XSS}"), FakeReply(status=500)])
    fake_llm.reply_with(lambda prompt: "no greeting")
    run_in_this_thread(run)
    page = context.new_page()
    log_in(page, expect)

    page.goto(f"/runs/{run.pk}/report/")
    detail = page.locator("#case-0-detail")
    expect(detail).not_to_have_attribute("open", "")
    detail.locator("summary").first.click()
    expect(detail).to_contain_text("You greet N0.")  # the system prompt, rendered
    expect(detail).to_contain_text("Say hello to N0.")  # the prompt
    expect(detail).to_contain_text("2 model calls, 1 retry")
    expect(detail.locator("details.repeat")).to_have_count(2)
    detail.locator("details.repeat summary").first.click()  # the passing one, closed at first
    expect(detail.locator("details.repeat").first).to_contain_text(XSS)
    assert page.locator("#cases script, #cases img").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"
    screenshot(page, "report-case-detail")

    page.goto(f"/runs/{run.pk}/")
    expect(page.locator("#run-status")).to_have_text("failed")
    expect(page.locator("#run-counts")).to_contain_text("1/1 cases done · 2/2 calls")
    page.locator("button[data-detail='0']").click()
    live_detail = page.locator("#run-results tr.detail-row #case-0-detail")
    expect(live_detail).to_contain_text("You greet N0.")
    expect(live_detail).to_contain_text("no greeting")
    page.locator("button[data-detail='0']").click()  # and closes again
    expect(page.locator("#run-results tr.detail-row")).to_have_count(0)
    screenshot(page, "run-case-detail")


def test_the_live_page_counts_calls_while_a_run_with_repeats_goes_on(
    context, expect, launcher, make_card, worker_factory
):
    provider = Provider.objects.create(
        name="Slow simulator",
        kind=Provider.Kind.SIMULATOR,
        model="sim",
        parameters={"latency_ms": 400, "jitter_ms": 0, "error_rate": 0},
    )
    run = launching.launch_run(
        card=make_card("repeats", cases=1), provider=provider, user=launcher, repeats=6
    )
    page = context.new_page()
    log_in(page, expect)
    page.goto(f"/runs/{run.pk}/")
    worker_factory(processes=1, threads=1)
    # One case, six calls: the page moves before the case is done.
    expect(page.locator("#run-counts")).to_contain_text(
        re.compile(r"0/1 cases done · [1-5]/6 calls")
    )
    expect(page.locator(".progress")).to_have_attribute("aria-valuenow", re.compile(r"^[1-9]\d?$"))
    screenshot(page, "run-calls-progress")
    expect(page.locator("#run-status")).to_have_text("succeeded")
    expect(page.locator("#run-counts")).to_contain_text("1/1 cases done · 6/6 calls")
