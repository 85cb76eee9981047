"""Executing cases in this process (the cross-process behaviour is in test_engine.py): the
response cache, repeats, stop on first failure, tokens and cost, and the run's phases."""

from __future__ import annotations

from decimal import Decimal

import pytest

from testruns.engine import admission, execution, launching
from testruns.models import Provider, ResponseCache, TestResult, TestRun
from tests.conftest import run_in_this_thread
from tests.fake_llm import FakeReply

pytestmark = pytest.mark.django_db


@pytest.fixture
def provider(fake_llm):
    return Provider.objects.create(
        name="fake",
        kind="openai",
        model="m",
        max_concurrency=4,
        base_url=fake_llm.base_url,
        price_input_per_mtok=3,
        price_output_per_mtok=15,
    )


def run_to_the_end(run: TestRun) -> TestRun:
    return run_in_this_thread(run)


def test_tokens_and_cost_come_from_usage_and_prices(provider, make_card):
    run = run_to_the_end(launching.launch_run(card=make_card(cases=1), provider=provider))
    result = run.results.get()
    assert result.tokens_in > 0 and result.tokens_out > 0
    expected = (Decimal(3) * result.tokens_in + Decimal(15) * result.tokens_out) / 1_000_000
    assert result.cost == expected and run.cost == expected
    assert (run.tokens_in, run.tokens_out) == (result.tokens_in, result.tokens_out)
    assert result.assertion_results[0]["passed"] is True


def test_cache_answers_repeated_prompts_but_never_stores_errors(provider, make_card, fake_llm):
    card = make_card(cases=1)
    fake_llm.script([FakeReply(status=400, body={"error": {"message": "bad request"}})])
    failed = run_to_the_end(launching.launch_run(card=card, provider=provider, use_cache=True))
    assert failed.results.get().status == "error" and not ResponseCache.objects.exists()

    fake_llm.latency = 0.2
    first = run_to_the_end(launching.launch_run(card=card, provider=provider, use_cache=True))
    calls = fake_llm.request_count
    second = run_to_the_end(launching.launch_run(card=card, provider=provider, use_cache=True))
    assert fake_llm.request_count == calls  # answered from the cache
    cached, fresh = second.results.get(), first.results.get()
    assert cached.cached and not fresh.cached and cached.output == fresh.output
    assert cached.latency_ms == fresh.latency_ms >= 200  # latency assertions see the real one
    assert cached.cost == 0

    run_to_the_end(launching.launch_run(card=card, provider=provider, use_cache=False))
    assert fake_llm.request_count == calls + 1


def test_repeats_pass_only_when_every_repetition_passes(provider, make_card, fake_llm):
    answers = iter(["N0 fine", "no name here", "N0 again"])
    fake_llm.reply_with(lambda prompt: next(answers))
    run = run_to_the_end(
        launching.launch_run(card=make_card(cases=1), provider=provider, repeats=3)
    )
    result = run.results.get()
    assert (result.status, result.repeat_passes, result.attempts) == ("failed", 2, 3)
    assert run.status == "failed"


def test_stop_on_first_failure_skips_the_rest(provider, make_card, fake_llm):
    fake_llm.reply_with(lambda prompt: "nothing matches")
    run = run_to_the_end(
        launching.launch_run(
            card=make_card(cases=5), provider=provider, stop_on_failure=True, max_concurrent_tests=1
        )
    )
    statuses = list(run.results.order_by("position").values_list("status", flat=True))
    assert statuses == ["failed", "skipped", "skipped", "skipped", "skipped"]
    assert (run.status, run.done_count, run.phase) == ("failed", 5, "done")


def test_phase_turns_to_validating_when_no_case_is_left_to_generate(provider, make_card):
    run = launching.launch_run(card=make_card(cases=2), provider=provider, max_concurrent_tests=2)
    admission.admit_runs()
    admission.admit_cases(provider.pk)
    first, second = TestResult.objects.filter(run=run).order_by("position")
    execution.note_validating(run, first)
    run.refresh_from_db()
    assert run.phase == "validating"  # both cases are in flight; none waits for the model

    other = launching.launch_run(
        card=make_card(slug="other", cases=3), provider=provider, max_concurrent_tests=1
    )
    admission.admit_runs()
    admission.admit_cases(provider.pk)
    execution.note_validating(other, other.results.order_by("position").last())
    other.refresh_from_db()
    assert other.phase == "generating"  # two cases still wait for their turn
