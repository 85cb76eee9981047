"""A reviewer works through a review queue in a real browser (issue 16): sends a finished
run's failures to review from its report, confirms one verdict, overrides another with a
note, and lands back on the report with the reviewed pass rate beside the automatic one."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission

from testruns.models import Review, TestResult, TestRun
from tests.browser import log_in, screenshot

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]


def test_a_reviewer_works_through_the_queue(
    context, expect, django_user_model, make_card, simulator
):
    reviewer = django_user_model.objects.create_user("rita", password="rita-password-1")
    reviewer.user_permissions.add(
        *Permission.objects.filter(codename__in=["review_result", "view_testrun"])
    )
    card = make_card("to-review", cases=4)
    run = TestRun.objects.create(
        card=card, version=card.versions.get(), provider=simulator, status="failed",
        phase="done", total_cases=4, done_count=4, passed_count=2, failed_count=2,
    )  # fmt: skip
    for case, status in zip(
        card.cases.order_by("order"), ["passed", "passed", "failed", "failed"], strict=True
    ):
        TestResult.objects.create(
            run=run, case=case, case_name=case.name, position=case.order, status=status,
            prompt="Say hello.", output=f"output of {case.name}",
            assertion_results=[
                {"type": "contains", "passed": status == "passed", "reason": "looked for N"}
            ],
        )  # fmt: skip
    TestRun.objects.filter(pk=run.pk).update(finished_at=run.queued_at)
    page = context.new_page()
    log_in(page, expect, "rita", "rita-password-1")

    page.goto(f"/runs/{run.pk}/report/")
    page.locator("#send-to-review input[name=sample]").uncheck()
    page.locator("#send-to-review button").click()
    expect(page.locator("#review-queue")).to_contain_text("2 results waiting")
    screenshot(page, "review-queue")

    page.click("#start-review")
    expect(page.locator("h1")).to_have_text("Review: case 2")
    expect(page.locator("#case-2-detail")).to_contain_text("output of case 2")
    expect(page.locator("#automatic-verdict")).to_have_text("failed")
    page.click("#decide")  # confirm, the default
    expect(page.locator("h1")).to_have_text("Review: case 3")
    page.check("input[name=decision][value=passed]")
    page.click("#decide")
    expect(page.locator("[role=alert]")).to_contain_text("Say why in a note")
    expect(page.locator("input[name=decision][value=passed]")).to_be_checked()
    page.fill("textarea[name=note]", "N3 is there, in another case")
    screenshot(page, "review-override")
    page.click("#decide")

    expect(page.locator("h1")).to_contain_text(f"Report: run #{run.pk}")
    expect(page.locator("#stat-pass-rate")).to_have_text("50 %")
    expect(page.locator("#stat-reviewed-pass-rate")).to_have_text("75 %")
    expect(page.locator("#cases")).to_contain_text("reviewed: passed (override)")
    screenshot(page, "report-reviewed")
    decided = dict(Review.objects.values_list("result__case_name", "verdict"))
    assert decided == {"case 2": "failed", "case 3": "passed"}
