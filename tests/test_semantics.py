"""Repeats, retries and grading mean what they say (issue 14): every repeat keeps its evidence
and the cache cannot fake pass^N; a burst of 429s lowers a provider's ceiling once; a vendor's
Retry-After is honoured as long as the case has time for it; stop on first failure also stops
on an error; and `llm-rubric` is graded by the provider the card or the run chose, with the
same retries, accounting and abandonment as generation.

Cases run in this process through execution.run_admitted_case against the fake vendor over real
HTTP and the real PostgreSQL (threads where concurrency is the point)."""

from __future__ import annotations

import re
import threading
import time
from decimal import Decimal

import pytest
from django.db import connection as own
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from testruns.catalog import assertions
from testruns.engine import admission, execution, gate, inflight, launching, limits
from testruns.models import PromptCard, Provider, Semaphore, TestResult, TestRun
from tests.conftest import assert_every_slot_returned, run_in_this_thread, wait_for
from tests.fake_llm import FakeReply

pytestmark = pytest.mark.django_db(transaction=True)

HOLDER = "semantics-test-worker"
RUBRIC = [{"type": "llm-rubric", "value": "Greets the person by name."}]
PASS = '{"pass": true, "reason": "greets them"}'


@pytest.fixture
def provider(fake_llm):
    return Provider.objects.create(
        name="fake",
        kind="openai",
        model="gen-model",
        base_url=fake_llm.base_url,
        max_concurrency=8,
        timeout_seconds=10,
        price_input_per_mtok=3,
        price_output_per_mtok=15,
    )


@pytest.fixture
def grader(fake_llm):
    return Provider.objects.create(
        name="judge",
        kind="openai",
        model="grader-model",
        base_url=fake_llm.base_url,
        max_concurrency=2,
        price_input_per_mtok=100,
        price_output_per_mtok=1000,
    )


def run_here(run: TestRun) -> TestRun:
    return run_in_this_thread(run, holder=HOLDER)


def models_asked(fake_llm) -> list[tuple[str, bool]]:
    """(model, was it a grading request) for every request the vendor got, in order."""
    return [
        (r.body["model"], "<rubric>" in r.body["messages"][-1]["content"])
        for r in fake_llm.requests
    ]


# --- 1. Repeats keep their evidence ---------------------------------------------------------


def test_every_repeat_is_kept_and_the_output_shown_is_a_failing_one(
    fake_llm, provider, make_card, client, launcher
):
    answers = iter(["N0 fine", "no name <b>here</b>", "N0 again"])
    fake_llm.reply_with(lambda prompt: next(answers))
    run = launching.launch_run(card=make_card(cases=1), provider=provider, repeats=3, user=launcher)

    run = run_here(run)

    result = run.results.get()
    assert (result.status, result.repeat_passes, result.attempts) == ("failed", 2, 3)
    # The evidence matches the verdict: the failing repeat's output and assertion outcomes.
    assert result.output == "no name <b>here</b>"
    assert [o["passed"] for o in result.assertion_results] == [False]
    assert result.score == 0.0
    repeats = result.repeat_results
    assert [r["output"] for r in repeats] == ["N0 fine", "no name <b>here</b>", "N0 again"]
    assert [r["passed"] for r in repeats] == [True, False, True]
    assert [r["score"] for r in repeats] == [1.0, 0.0, 1.0]
    assert repeats[1]["assertion_results"][0]["reason"].startswith('output does not contain "N0"')
    assert all(r["latency_ms"] > 0 and r["tokens_out"] > 0 and not r["cached"] for r in repeats)
    assert result.tokens_out == sum(r["tokens_out"] for r in repeats)

    client.force_login(launcher)
    html = client.get(reverse("report", args=[run.pk])).content.decode()
    summary = re.sub(r"<[^>]+>|\s+", " ", html)
    assert re.search(r"repeat\s+1 ✓\s+2 ✗\s+3 ✓", summary), summary
    assert "no name &lt;b&gt;here&lt;/b&gt;" in html and "<b>here</b>" not in html
    assert html.count("N0 again") == 1  # each repeat's output is in the case's detail, once


def test_a_single_repeat_keeps_no_separate_evidence(fake_llm, provider, make_card):
    run = run_here(launching.launch_run(card=make_card(cases=1), provider=provider))

    result = run.results.get()
    assert result.status == "passed" and result.repeat_results == []


def test_the_cache_answers_only_the_first_repeat(fake_llm, provider, make_card):
    card = make_card(cases=1)
    answers = iter(["N0 one", "nothing", "N0 three", "N0 four", "N0 five"])
    fake_llm.reply_with(lambda prompt: next(answers))

    first = run_here(launching.launch_run(card=card, provider=provider, repeats=3, use_cache=True))

    # Repeats sample the model: the second and third asked it, not the answer just cached.
    assert fake_llm.request_count == 3
    result = first.results.get()
    assert result.status == "failed" and result.output == "nothing"
    assert [r["cached"] for r in result.repeat_results] == [False, False, False]

    second = run_here(launching.launch_run(card=card, provider=provider, repeats=3, use_cache=True))

    assert fake_llm.request_count == 5  # one cached answer, two fresh ones
    result = second.results.get()
    assert [r["output"] for r in result.repeat_results] == ["N0 one", "N0 four", "N0 five"]
    assert [r["cached"] for r in result.repeat_results] == [True, False, False]
    assert result.status == "passed" and result.repeat_passes == 3 and result.cached
    assert result.attempts == 2  # calls made; the cached answer cost none


# --- 2. AIMD: one decrease per window ------------------------------------------------------


def test_a_429_lowers_the_ceiling_only_for_requests_sent_after_the_last_decrease(provider):
    limits.ensure_semaphores(provider)
    name = gate.provider_semaphore(provider.pk)

    assert gate.throttle_provider(provider.pk, sent_seconds_ago=5.0) is True
    assert Semaphore.objects.get(name=name).effective_limit == 4
    # Sent five seconds ago, before that decrease: part of the same window.
    assert gate.throttle_provider(provider.pk, sent_seconds_ago=5.0) is False
    assert Semaphore.objects.get(name=name).effective_limit == 4
    # Sent after it: the lower ceiling is still too high.
    assert gate.throttle_provider(provider.pk, sent_seconds_ago=0.0) is True
    semaphore = Semaphore.objects.get(name=name)
    assert semaphore.effective_limit == 2 and semaphore.throttled_at is not None


def test_eight_concurrent_429s_halve_the_ceiling_once(fake_llm, provider, make_card):
    def throttled_once_all_are_in(prompt: str) -> FakeReply:
        # Every request has arrived before the first 429 goes back.
        wait_for(lambda: fake_llm.request_count >= 8, timeout=20, what="eight requests")
        return FakeReply(status=429)

    fake_llm.reply_with(throttled_once_all_are_in)
    run = launching.launch_run(
        card=make_card(cases=8), provider=provider, max_concurrent_tests=8, max_retries=0
    )
    admission.admit_runs()
    admission.admit_cases(provider.pk)
    admitted = list(
        TestResult.objects.filter(run=run, status="running").values_list("pk", flat=True)
    )
    assert len(admitted) == 8

    def work(result_id: int) -> None:

        try:
            execution.run_admitted_case(result_id, HOLDER, keep_going=lambda: False)
        finally:
            own.close()

    threads = [threading.Thread(target=work, args=(pk,)) for pk in admitted]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    run.refresh_from_db()
    assert (run.status, run.error_count) == ("error", 8)
    assert fake_llm.peak_concurrency == 8
    semaphore = Semaphore.objects.get(name=gate.provider_semaphore(provider.pk))
    assert semaphore.effective_limit == 4  # 8 -> 4, not 8 -> 4 -> 2 -> 1
    assert_every_slot_returned()


# --- 3. Retry-After up to the case's remaining time ----------------------------------------


def test_a_retry_after_beyond_the_cases_time_ends_it_at_once(fake_llm, provider, make_card):
    fake_llm.script([FakeReply(status=429, headers={"Retry-After": "120"})])
    run = launching.launch_run(
        card=make_card(cases=1), provider=provider, timeout_seconds=5, max_retries=2
    )
    started = time.monotonic()

    run = run_here(run)

    assert time.monotonic() - started < 5
    result = run.results.get()
    assert result.status == "error" and result.attempts == 1
    # The case may take timeout x (retries + 1) = 15 s in all.
    assert re.fullmatch(
        r"the vendor asked to retry after 120 s, more than the 1[45] s this case has left",
        result.error,
    ), result.error
    assert fake_llm.request_count == 1
    assert_every_slot_returned()


def test_a_retry_after_that_fits_is_waited_for(fake_llm, provider, make_card):
    fake_llm.script([FakeReply(status=503, headers={"Retry-After": "1.5"})])
    run = launching.launch_run(
        card=make_card(cases=1), provider=provider, timeout_seconds=5, max_retries=2
    )
    started = time.monotonic()

    run = run_here(run)

    assert time.monotonic() - started >= 1.5
    result = run.results.get()
    assert (result.status, result.attempts) == ("passed", 2)


def test_the_case_budget_counts_every_call_it_may_make(provider, make_card):
    card = make_card(cases=1)
    card.cases.update(assertions=[*RUBRIC, *RUBRIC, {"type": "contains", "value": "x"}])
    run = launching.launch_run(
        card=card, provider=provider, timeout_seconds=2, max_retries=1, repeats=3
    )
    result = run.results.get()

    # 3 repeats x (1 answer + 2 gradings) x 2 attempts x 2 s
    assert execution.case_budget_seconds(run, result) == 36
    TestResult.objects.filter(pk=result.pk).update(assertions=7)  # nonsense: no crash
    result.refresh_from_db()
    assert execution.case_budget_seconds(run, result) == 12


# --- 4. Stop on first failure also stops on an error ---------------------------------------


def test_stop_on_first_failure_stops_on_an_error_too(fake_llm, provider, make_card):
    fake_llm.script([FakeReply(status=400, text="bad request")])
    run = run_here(
        launching.launch_run(
            card=make_card(cases=4), provider=provider, stop_on_failure=True, max_concurrent_tests=1
        )
    )

    statuses = list(run.results.order_by("position").values_list("status", flat=True))
    assert statuses == ["error", "skipped", "skipped", "skipped"]
    assert (run.status, run.done_count, run.error_count, run.phase) == ("error", 4, 1, "done")
    assert fake_llm.request_count == 1
    assert_every_slot_returned()


# --- 5. The grader is a choice --------------------------------------------------------------


def grading_vendor(fake_llm, *, grade: str | FakeReply = PASS) -> None:
    """Answers rubric prompts with `grade` and everything else with a greeting."""
    fake_llm.reply_with(lambda prompt: grade if "<rubric>" in prompt else "Hello N0!")


def rubric_card(make_card, slug: str = "graded", grader: Provider | None = None) -> PromptCard:
    card = make_card(slug=slug, cases=1, grader_provider=grader)
    card.cases.update(assertions=RUBRIC)
    return card


def test_the_cards_grader_grades_and_its_tokens_and_cost_are_counted(
    fake_llm, provider, grader, make_card
):
    grading_vendor(fake_llm)
    run = launching.launch_run(card=rubric_card(make_card, grader=grader), provider=provider)
    assert run.grader_provider == grader  # pinned at launch

    run = run_here(run)

    assert models_asked(fake_llm) == [("gen-model", False), ("grader-model", True)]
    result = run.results.get()
    assert result.status == "passed" and result.assertion_results[0]["reason"] == (
        "grader: greets them"
    )
    generated, graded = (r.body for r in fake_llm.requests)
    gen_in, gen_out = _words(generated), 2  # "Hello N0!"
    grade_in, grade_out = _words(graded), len(PASS.split())
    assert (result.tokens_in, result.tokens_out) == (gen_in + grade_in, gen_out + grade_out)
    expected = (3 * gen_in + 15 * gen_out + 100 * grade_in + 1000 * grade_out) / Decimal(10**6)
    assert result.cost == expected and run.cost == expected
    assert (run.tokens_in, run.tokens_out) == (result.tokens_in, result.tokens_out)
    assert result.attempts == 1  # the case's own calls; grading is not an attempt of it


def _words(body: dict) -> int:
    return sum(len(m["content"].split()) for m in body["messages"])


def test_a_run_can_override_the_cards_grader_and_defaults_to_its_own_provider(
    fake_llm, provider, grader, make_card
):
    grading_vendor(fake_llm)
    card = rubric_card(make_card, grader=grader)
    overridden = launching.launch_run(card=card, provider=provider, grader_provider=provider)
    assert overridden.grader_provider == provider
    run_here(overridden)
    assert models_asked(fake_llm) == [("gen-model", False), ("gen-model", True)]

    fake_llm.reset()
    grading_vendor(fake_llm)
    plain = launching.launch_run(card=rubric_card(make_card, "plain"), provider=provider)
    assert plain.grader_provider is None
    assert run_here(plain).results.get().status == "passed"
    assert models_asked(fake_llm) == [("gen-model", False), ("gen-model", True)]


def test_a_disabled_grader_cannot_be_launched_with(provider, grader, make_card):
    Provider.objects.filter(pk=grader.pk).update(enabled=False)
    grader.refresh_from_db()

    with pytest.raises(launching.LaunchError, match="judge is disabled"):
        launching.launch_run(card=rubric_card(make_card, grader=grader), provider=provider)


def test_a_grader_still_rate_limited_after_its_retries_makes_the_case_an_error(
    fake_llm, provider, grader, make_card
):
    limited = FakeReply(status=429, headers={"Retry-After": "0"})
    grading_vendor(fake_llm, grade=limited)
    run = launching.launch_run(
        card=rubric_card(make_card, grader=grader), provider=provider, max_retries=1
    )

    run = run_here(run)

    # Retried like generation: one answer, then two grading attempts.
    assert models_asked(fake_llm) == [
        ("gen-model", False),
        ("grader-model", True),
        ("grader-model", True),
    ]
    result = run.results.get()
    assert result.status == "error"
    assert result.error == (
        "llm-rubric (assertion 1): the grader judge (grader-model) could not answer: "
        "HTTP 429 rate limited (retry after 0.0s)"
    )
    outcome = result.assertion_results[0]
    assert outcome["error"] is True and outcome["passed"] is False
    assert outcome["reason"].startswith("the grader judge (grader-model) could not answer")
    assert result.output == "Hello N0!"  # what was being graded stays visible
    assert (run.status, run.error_count, run.failed_count) == ("error", 1, 0)
    # The grader's 429 slowed the grader down, not the generating provider.
    assert Semaphore.objects.get(name=gate.provider_semaphore(provider.pk)).effective_limit is None
    assert_every_slot_returned()


def test_a_grader_that_times_out_makes_the_case_an_error(fake_llm, provider, grader, make_card):
    grading_vendor(fake_llm, grade=FakeReply(hang=True))
    run = launching.launch_run(
        card=rubric_card(make_card, grader=grader),
        provider=provider,
        timeout_seconds=1,
        max_retries=0,
    )

    run = run_here(run)

    result = run.results.get()
    assert result.status == "error"
    assert result.error == (
        "llm-rubric (assertion 1): the grader judge (grader-model) could not answer: "
        "timed out after 1.0s"
    )
    assert result.assertion_results[0]["error"] is True
    assert_every_slot_returned()


def test_a_grader_call_is_abandoned_when_the_case_is_cancelled(
    fake_llm, provider, grader, make_card
):
    grading_vendor(fake_llm, grade=FakeReply(hang=True))
    run = launching.launch_run(
        card=rubric_card(make_card, grader=grader), provider=provider, timeout_seconds=60
    )
    admission.admit_runs()
    admission.admit_cases(provider.pk)
    result = TestResult.objects.get(run=run)
    done = threading.Event()

    def work() -> None:

        try:
            execution.run_admitted_case(result.pk, HOLDER, keep_going=lambda: False)
        finally:
            own.close()
            done.set()

    threading.Thread(target=work, daemon=True).start()
    wait_for(lambda: fake_llm.request_count == 2 and fake_llm.in_flight == 1, what="grading")
    launching.cancel_run(run)
    started = time.monotonic()
    inflight.notice_lost_leases()  # what the sweep thread does every tick

    assert done.wait(10), "the worker thread still waits for the grader"
    assert time.monotonic() - started < 5
    result.refresh_from_db()
    assert result.status == "skipped"  # the cancel's word stands; nothing was written over it
    assert_every_slot_returned()


def test_the_grader_is_exposed_in_the_launch_api(provider, grader, make_card, launcher):

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=launcher).key}")
    card = rubric_card(make_card)

    response = api.post(
        "/api/runs/",
        {"card": card.pk, "provider": provider.pk, "grader_provider": grader.pk},
        format="json",
    )

    assert response.status_code == 201, response.json()
    assert response.json()["grader_provider"] == grader.pk
    assert TestRun.objects.get(pk=response.json()["id"]).grader_provider == grader


def test_an_assertion_error_is_neither_a_pass_nor_a_failure():
    def unavailable(prompt: str) -> str:
        raise assertions.GradingError("the grader g could not answer: HTTP 503")

    verdict = assertions.evaluate(
        [{"type": "contains", "value": "x"}, *RUBRIC], output="x", grade=unavailable
    )

    assert not verdict.passed
    assert verdict.error == "llm-rubric (assertion 2): the grader g could not answer: HTTP 503"
    contains, rubric = (o.as_dict() for o in verdict.outcomes)
    assert "error" not in contains  # the stored shape of ordinary outcomes is unchanged
    assert rubric["error"] is True and rubric["passed"] is False


def test_the_grader_can_be_chosen_on_the_launch_page(client, launcher, provider, grader, make_card):
    card = rubric_card(make_card)
    client.force_login(launcher)
    form = {
        "card": card.pk,
        "providers": [provider.pk],
        "selection": "all",
        "priority": 0,
        "max_concurrent_tests": 4,
        "timeout_seconds": 60,
        "max_retries": 2,
        "repeats": 1,
    }
    assert "Grader provider" in client.get(reverse("launch"), {"card": card.pk}).content.decode()

    client.post(reverse("launch"), {**form, "grader_provider": grader.pk})
    client.post(reverse("launch"), form)

    chosen, default = TestRun.objects.order_by("pk")
    assert (chosen.grader_provider, default.grader_provider) == (grader, None)


def test_the_live_page_gets_each_repeats_verdict_and_output(
    fake_llm, provider, make_card, client, launcher
):
    answers = iter(["N0 fine", "<i>no</i>"])
    fake_llm.reply_with(lambda prompt: next(answers))
    run = launching.launch_run(card=make_card(cases=1), provider=provider, repeats=2, user=launcher)
    run_here(run)
    client.force_login(launcher)

    snapshot = client.get(reverse("run-status", args=[run.pk])).json()

    (row,) = snapshot["results"]
    assert row["repeats"] == [
        {"passed": True, "output": "N0 fine"},
        {"passed": False, "output": "<i>no</i>"},  # text for textContent, never markup
    ]
    assert row["output"] == "<i>no</i>"
