"""Executing one admitted case, from claiming its lease to recording its result.

Work is at-least-once (a case whose worker died is run again), results exactly-once: a
result is written only while it is still `running`, by whichever execution gets there
first. No transaction is open while the provider is called.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from decimal import Decimal

from django.db import connection, reset_queries, transaction
from django.db.models import Exists
from django.db.models.functions import Now
from django.utils import timezone

from testruns import assertions, events, gate, inflight, providers
from testruns.logging import log_context
from testruns.models import Provider, ResponseCache, TestResult, TestRun
from testruns.prompts import render_prompt

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_SECONDS = 30.0


@dataclass
class CaseOutcome:
    status: str
    fields: dict = field(default_factory=dict)
    throttled: bool = False


def execute_case(result_id: int, holder: str, *, keep_going=lambda: True) -> None:
    """Run an admitted case, then keep running the cases its released slot hands over.

    1. Claim the case's lease for this worker (return if another delivery has it).
    2. Render, call the provider (with retries) and check the assertions, no transaction open.
    3. Record the result exactly once, give back the slot and promote the next case; if that
       was the run's last case, finish the run and hand its slot to the next run.
    4. If `keep_going()` allowed it, a case promoted in 3. was kept for this thread instead
       of going through the broker: go on with it at 2.
    """
    lease_id = gate.claim_case(result_id, holder)
    while lease_id is not None:
        with gate.handing_over_to(holder if keep_going() else None) as taken:
            run_claimed_case(result_id, lease_id)
        if not taken:
            return
        result_id, lease_id = taken[0].result_id, taken[0].lease_id


def run_claimed_case(result_id: int, lease_id: int) -> None:
    # With DEBUG on, Django keeps every query of a connection until a request starts; a
    # worker thread never starts one.
    reset_queries()
    result = TestResult.objects.select_related("run__version", "run__provider").get(pk=result_id)
    run = result.run
    with log_context(run_id=run.pk, case_id=result.case_id):
        log.info("case started")
        with inflight.watching(lease_id) as lost:
            try:
                outcome = run_case(run, result, lost)
            except inflight.CaseAbandoned:
                log.info("case abandoned: its lease is gone")
                return
        if record_case(run, result, lease_id, outcome):
            finish_run(run.pk)


def run_case(run: TestRun, result: TestResult, lost=None) -> CaseOutcome:
    try:
        system = render_prompt(run.version.system_prompt, result.variables)
        prompt = render_prompt(run.version.template, result.variables)
    except Exception as exc:  # a template error belongs to this case, not the worker
        return CaseOutcome(TestResult.Status.ERROR, {"error": f"Template error: {exc}"})
    tracker = CallTracker()
    passes, verdict, completion = 0, None, None
    try:
        for _ in range(run.repeats):
            completion, cached = generate(run, system, prompt, tracker, lost)
            note_validating(run, result)
            cost = Decimal(0) if cached else providers.cost_of(
                run.provider, completion.tokens_in, completion.tokens_out)
            verdict = assertions.evaluate(
                result.assertions, output=completion.text, latency_ms=completion.latency_ms,
                cost=cost, threshold=result.threshold, grade=grader_for(run))
            passes += verdict.passed
            tracker.add_usage(completion, cost, cached)
    except providers.ProviderError as exc:
        return CaseOutcome(TestResult.Status.ERROR,
                           {"error": str(exc), "prompt": prompt, **tracker.fields()},
                           throttled=tracker.throttled)
    status = TestResult.Status.PASSED if passes == run.repeats else TestResult.Status.FAILED
    return CaseOutcome(status, {
        "prompt": prompt, "output": completion.text, "latency_ms": completion.latency_ms,
        "assertion_results": [o.as_dict() for o in verdict.outcomes], "score": verdict.score,
        "repeat_passes": passes, **tracker.fields(),
    }, throttled=tracker.throttled)


def note_validating(run: TestRun, result: TestResult) -> None:
    """The run's phase turns from generating to validating once no case is left to send to
    the model, only checks of cases in flight (llm-rubric grading can take a while). Only the
    last wave of cases can make that true, so only they ask."""
    if result.position < run.total_cases - run.max_concurrent_tests:
        return
    TestRun.objects.filter(pk=run.pk, phase=TestRun.Phase.GENERATING).filter(
        ~Exists(TestResult.objects.filter(run=run.pk, status=TestResult.Status.PENDING))
    ).update(phase=TestRun.Phase.VALIDATING)


@dataclass
class CallTracker:
    attempts: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: Decimal = Decimal(0)
    cached: bool = False
    throttled: bool = False

    def add_usage(self, completion: providers.Completion, cost: Decimal, cached: bool) -> None:
        self.tokens_in += completion.tokens_in
        self.tokens_out += completion.tokens_out
        self.cost += cost
        self.cached = self.cached or cached

    def fields(self) -> dict:
        return {"attempts": self.attempts, "tokens_in": self.tokens_in,
                "tokens_out": self.tokens_out, "cost": self.cost, "cached": self.cached}


def generate(run: TestRun, system: str, prompt: str, tracker: CallTracker,
             lost=None) -> tuple[providers.Completion, bool]:
    """The model's answer, from the cache when the run allows it. Errors are never cached;
    a cached answer keeps the latency it was measured with."""
    key = cache_key(run.provider, system, prompt) if run.use_cache else None
    if key and (hit := ResponseCache.objects.filter(key=key).first()):
        return providers.Completion(hit.text, hit.tokens_in, hit.tokens_out, hit.latency_ms), True
    completion = call_with_retries(run, system, prompt, tracker, lost)
    if key:
        ResponseCache.objects.get_or_create(key=key, defaults={
            "text": completion.text, "tokens_in": completion.tokens_in,
            "tokens_out": completion.tokens_out, "latency_ms": completion.latency_ms})
    return completion, False


def cache_key(provider: Provider, system: str, prompt: str) -> str:
    material = json.dumps([provider.pk, provider.kind, provider.model, provider.base_url,
                           provider.parameters, system, prompt], sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()


def call_with_retries(run: TestRun, system: str, prompt: str, tracker: CallTracker,
                      lost=None) -> providers.Completion:
    """Retry 429s, 5xx and network errors with exponential backoff and full jitter,
    honouring Retry-After; a 429 also halves the provider's effective concurrency. Raises
    CaseAbandoned as soon as the case's lease is lost (`lost` is set)."""
    for attempt in range(run.max_retries + 1):
        tracker.attempts += 1
        try:
            return inflight.call(lambda: providers.complete(
                run.provider, system=system, prompt=prompt, timeout=run.timeout_seconds), lost)
        except providers.ProviderError as exc:
            if exc.status == 429:
                tracker.throttled = True
                gate.throttle_provider(run.provider_id)
            if not exc.retryable or attempt == run.max_retries:
                raise
            delay = exc.retry_after if exc.retry_after is not None else backoff(attempt)
            log.info("retrying after %.2fs: %s", delay, exc, extra={"run_id": run.pk})
            inflight.wait(min(delay, MAX_RETRY_DELAY_SECONDS), lost)
    raise AssertionError("unreachable")


def backoff(attempt: int, base: float = 0.5, cap: float = 20.0) -> float:
    return random.uniform(0, min(cap, base * 2**attempt))


def grader_for(run: TestRun):
    """`llm-rubric` asks a model; the run's own provider grades unless settings name one."""
    def grade(grading_prompt: str) -> str:
        return providers.complete(run.provider, system="You are a strict, fair grader.",
                                  prompt=grading_prompt, timeout=run.timeout_seconds).text
    return grade


COUNTERS = {
    TestResult.Status.PASSED: "passed_count",
    TestResult.Status.FAILED: "failed_count",
    TestResult.Status.ERROR: "error_count",
}


def record_case(run: TestRun, result: TestResult, lease_id: int, outcome: CaseOutcome) -> bool:
    """Write the outcome exactly once, update the run's totals, give back the call slot and
    promote the next case, in one transaction. Returns True when the run has no case left."""
    with transaction.atomic():
        # The semaphore row is locked first (by giving back the slot), then data rows.
        locked = gate.give_back_case(run.provider_id, lease_id, succeeded=(
            outcome.status != TestResult.Status.ERROR and not outcome.throttled))
        written = TestResult.objects.filter(pk=result.pk, status=TestResult.Status.RUNNING).update(
            status=outcome.status, finished_at=timezone.now(), **outcome.fields)
        complete = False
        if written:
            skipped = 0
            if outcome.status == TestResult.Status.FAILED and run.stop_on_failure:
                skipped = TestResult.objects.filter(
                    run=run, status=TestResult.Status.PENDING
                ).update(status=TestResult.Status.SKIPPED, finished_at=timezone.now())
            totals = add_to_totals(run.pk, outcome, skipped)
            complete = totals["done_count"] >= totals["total_cases"]
            events.announce(run.pk, kind="progress", force=False)
        gate.admit_next_cases(run.provider_id, locked)
    return complete


def add_to_totals(run_id: int, outcome: CaseOutcome, skipped: int) -> dict:
    counter = COUNTERS.get(outcome.status)
    bump = f", {counter} = {counter} + 1" if counter else ""
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE testruns_testrun SET done_count = done_count + 1 + %s{bump}, "
            "tokens_in = tokens_in + %s, tokens_out = tokens_out + %s, cost = cost + %s "
            "WHERE id = %s RETURNING done_count, total_cases, passed_count, failed_count, "
            "error_count",
            [skipped, outcome.fields.get("tokens_in", 0), outcome.fields.get("tokens_out", 0),
             outcome.fields.get("cost", 0), run_id])
        names = [column.name for column in cursor.description]
        return dict(zip(names, cursor.fetchone(), strict=True))


def finish_run(run_id: int) -> bool:
    """Close a running run whose cases are all done and hand its slot to the next run."""
    with transaction.atomic():
        gate.lock_runs()
        run = TestRun.objects.select_for_update().get(pk=run_id)
        if run.status != TestRun.Status.RUNNING or run.done_count < run.total_cases:
            return False
        if run.error_count:
            run.status = TestRun.Status.ERROR
        elif run.failed_count:
            run.status = TestRun.Status.FAILED
        else:
            run.status = TestRun.Status.SUCCEEDED
        run.phase = TestRun.Phase.DONE
        run.finished_at = Now()  # the database clock, like every time the gate writes
        run.save(update_fields=["status", "phase", "finished_at"])
        events.announce(run_id)
        gate.release_run(run_id)
    log.info("run finished: %s", run.status, extra={"run_id": run_id})
    return True
