"""The review queue (issue 16): only a user with review_result may send results to review,
work through the queue and decide; a decision is kept beside the automatic verdict, never in
its place; the reviewed pass rate shows in the report and the exports; and the report and
the compare page say the verdict that knows noise."""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from testruns.models import Review, TestResult, TestRun
from testruns.reviewing import queue

pytestmark = pytest.mark.django_db


@pytest.fixture
def reviewer(django_user_model):
    user = django_user_model.objects.create_user("rita", password="rita-password-1")
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["review_result", "view_testrun"])
    )
    return user


@pytest.fixture
def finished_run(make_card, simulator, user):
    """A finished run of 10 one-trial cases: 7 passed, 2 failed, 1 error."""
    card = make_card("reviewed", cases=10)
    run = TestRun.objects.create(
        card=card, version=card.versions.get(), provider=simulator, launched_by=user,
        status="error", phase="done", total_cases=10, done_count=10, passed_count=7,
        failed_count=2, error_count=1,
    )  # fmt: skip
    statuses = ["passed"] * 7 + ["failed", "failed", "error"]
    for case, status in zip(card.cases.order_by("order"), statuses, strict=True):
        TestResult.objects.create(
            run=run, case=case, case_name=case.name, position=case.order, status=status,
            prompt=f"Say hello to {case.variables['name']}.", output="<i>hi</i>",
            assertion_results=[{"type": "contains", "passed": status == "passed",
                                "reason": "checked"}],
        )  # fmt: skip
    TestRun.objects.filter(pk=run.pk).update(finished_at=run.queued_at)
    run.refresh_from_db()
    return run


def test_only_a_reviewer_may_send_to_review_see_the_queue_and_decide(
    client, finished_run, user, reviewer
):
    client.force_login(user)  # launched the run, may see it, may not review
    assert client.post(reverse("review-run", args=[finished_run.pk])).status_code == 403
    assert client.get(reverse("review-queue")).status_code == 403
    queue.mark_for_review(finished_run, user=reviewer)
    item = Review.objects.first()
    assert client.get(reverse("review", args=[item.pk])).status_code == 403
    assert (
        client.post(reverse("review", args=[item.pk]), {"decision": "confirm"}).status_code == 403
    )

    client.force_login(reviewer)
    assert client.get(reverse("review-queue")).status_code == 200
    assert client.get(reverse("review", args=[item.pk])).status_code == 200


def test_a_run_sends_its_failures_and_a_sample_of_its_passes_once(finished_run, reviewer):
    added = queue.mark_for_review(finished_run, user=reviewer, sample=0.1)

    assert added == {"failure": 3, "sample": 1}
    reasons = dict(Review.objects.values_list("result__status", "reason").distinct())
    assert reasons == {"failed": "failure", "error": "failure", "passed": "sample"}
    assert queue.mark_for_review(finished_run, user=reviewer) == {}  # already in the queue
    assert Review.objects.count() == 4


def test_an_override_is_kept_beside_the_verdict_and_counts_in_the_reviewed_pass_rate(
    client, finished_run, reviewer
):
    queue.mark_for_review(finished_run, user=reviewer, sample=0.0)
    failed = Review.objects.get(result__position=7)
    client.force_login(reviewer)

    refused = client.post(reverse("review", args=[failed.pk]), {"decision": "passed"})
    assert refused.status_code == 400 and b"Say why in a note" in refused.content

    decided = client.post(
        reverse("review", args=[failed.pk]),
        {"decision": "passed", "note": "the greeting is there, <b>cased</b> otherwise"},
    )
    assert decided.status_code == 302
    following = Review.objects.get(pk=int(decided["Location"].rstrip("/").split("/")[-1]))
    assert following.result.run_id == finished_run.pk and following.is_pending

    failed.refresh_from_db()
    assert (failed.verdict, failed.reviewer, failed.overrides) == ("passed", reviewer, True)
    assert failed.result.status == "failed"  # the automatic verdict stays as it was
    client.post(reverse("review", args=[following.pk]), {"decision": "confirm"})

    report = client.get(reverse("report", args=[finished_run.pk]))
    assert report.context["reviewed"] == {
        "evaluated": 10, "passed": 8, "reviewed": 2, "overridden": 1, "pass_rate": 0.8,
    }  # fmt: skip
    html = report.content.decode()
    assert 'id="stat-reviewed-pass-rate">80 %' in html
    assert "reviewed: passed (override)" in html
    assert "&lt;b&gt;cased&lt;/b&gt;" in html and "<b>cased</b>" not in html

    exported = json.loads(
        b"".join(client.get(reverse("report-json", args=[finished_run.pk])).streaming_content)
    )
    assert exported["reviewed"]["pass_rate"] == 0.8
    by_position = {r["position"]: r for r in exported["results"]}
    assert by_position[7]["status"] == "failed"
    assert by_position[7]["review"]["verdict"] == "passed"
    assert by_position[7]["review"]["reviewer"] == "rita"
    assert by_position[0]["review"] is None
    rows = list(
        csv.DictReader(
            io.StringIO(
                b"".join(
                    client.get(reverse("report-csv", args=[finished_run.pk])).streaming_content
                ).decode()
            )
        )
    )
    assert (rows[7]["status"], rows[7]["review_verdict"]) == ("failed", "passed")
    assert rows[7]["review_note"].startswith("the greeting is there")


def test_the_last_decision_leads_back_to_the_report(client, finished_run, reviewer):
    queue.mark_for_review(finished_run, user=reviewer, sample=0.0)
    client.force_login(reviewer)
    location = reverse("review-next")
    for _ in range(3):
        page = client.get(location, follow=True)
        item = page.context["review"]
        response = client.post(reverse("review", args=[item.pk]), {"decision": "confirm"})
        location = response["Location"]
    assert location == reverse("report", args=[finished_run.pk])
    assert not Review.objects.filter(verdict="").exists()
    assert client.get(reverse("review-next"))["Location"] == reverse("review-queue")


def test_cases_with_too_little_evidence_go_to_review(
    client, finished_run, reviewer, make_card, simulator, user
):
    # A later run of the same card: case 0 now fails once, with one trial each: too little
    # evidence to call it a regression, so a person should look.
    later = TestRun.objects.create(
        card=finished_run.card, version=finished_run.version, provider=simulator,
        launched_by=user, status="failed", phase="done", total_cases=1, done_count=1,
    )  # fmt: skip
    case = finished_run.card.cases.get(order=0)
    TestResult.objects.create(
        run=later, case=case, case_name=case.name, position=0, status="failed"
    )
    TestRun.objects.filter(pk=later.pk).update(finished_at=later.queued_at)

    added = queue.mark_for_review(later, user=reviewer, failures=False, sample=0.0)

    assert added == {"no-evidence": 1}
    client.force_login(reviewer)
    html = client.get(reverse("report", args=[later.pk])).content.decode()
    assert 'id="run-verdict">no significant change' in html
    assert "Not enough evidence to tell: #1 case 0 (1/1 → 0/1)" in html
    assert "in review" in html


def test_the_report_and_the_compare_page_say_the_verdict_that_knows_noise(
    client, make_card, simulator, reviewer
):
    card = make_card("noisy", cases=1)
    case = card.cases.get()
    runs = []
    for passes in (10, 2):
        run = TestRun.objects.create(
            card=card, version=card.versions.get(), provider=simulator, status="failed",
            phase="done", total_cases=1, done_count=1, repeats=10,
        )  # fmt: skip
        TestResult.objects.create(
            run=run, case=case, case_name=case.name, position=0,
            status="passed" if passes == 10 else "failed", repeat_passes=passes,
            repeat_results=[{"passed": n < passes, "output": "x"} for n in range(10)],
        )  # fmt: skip
        TestRun.objects.filter(pk=run.pk).update(finished_at=run.queued_at)
        runs.append(run)
    client.force_login(reviewer)

    report = client.get(reverse("report", args=[runs[1].pk])).content.decode()
    assert 'id="run-verdict">regression' in report
    assert "Regression: #1 case 0: 10/10 → 2/10 passed (p = 0.0004" in report

    compare = client.get(reverse("compare"), {"runs": f"{runs[0].pk},{runs[1].pk}"})
    html = compare.content.decode()
    assert html.count('data-role="run-verdict"') == 1  # the second column, against the first
    assert 'data-role="run-verdict" title="against' in html and ">regression</span>" in html
    assert 'data-role="case-verdict"' in html
