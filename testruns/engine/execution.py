"""Executing one admitted case: claiming its lease, running it (render, ask the model
`repeats` times, check the assertions) and handing it to recording; then going on with the
cases its freed slot hands over. Calling the model (retries, Retry-After, cache, grader) is in
calls, writing the outcome (exactly once, whatever the database says) in recording.

Work is at-least-once (a case whose worker died is run again), results exactly-once: a
result is written only while it is still `running`, by whichever execution gets there
first. No transaction is open while the provider is called.

Everything after the claim ends. Whatever the vendor answers, whatever the database refuses
and whatever exception nobody foresaw, a claimed case gets a result and gives back its slot:

- a provider failure of any kind is an ERROR result saying what went wrong;
- text the database cannot store (NUL, lone surrogates) is replaced with U+FFFD and numbers
  it cannot store are clamped, and the result says so (recording.storable);
- any other exception is an ERROR result naming it ("unexpected error: KeyError: 'x'");
- a failed write is retried on a fresh connection, then written as a bare ERROR; if even
  that fails (the database is gone), the lease is handed to the sweeper, because this
  process's heartbeat would otherwise keep it alive forever (recording.close_case);
- the actor's time limit (an exception raised asynchronously in the thread) records the
  case as ERROR, other interrupts (shutdown) put it back in the queue, and both re-raise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal

from django.conf import settings
from django.db import DatabaseError, reset_queries
from django.db.models import Exists
from dramatiq.middleware.time_limit import TimeLimitExceeded

from testruns.catalog import assertions
from testruns.catalog.prompts import render_prompt
from testruns.engine import admission, gate, inflight, providers
from testruns.engine.calls import CallTracker, embedder_for, generate, grader_for
from testruns.engine.followups import followups
from testruns.engine.recording import (
    CaseOutcome,
    close_case,
    count_call,
    forsake,
    hand_back_case,
    keep_spent,
    unexpected,
)
from testruns.models import TestResult, TestRun
from testruns.ops.log_context import log_context

log = logging.getLogger(__name__)

# A thread keeps the cases its freed slots hand over for at most this long (and at most a
# quarter of the actor's time limit), then sends the next one through the broker: a chain of
# cases, each well within the limit, must not add up to it.
HANDOVER_BUDGET_SECONDS = 60.0


def case_time_limit_seconds() -> float:
    """The actor's time limit (CASE_TIME_LIMIT_SECONDS)."""
    return max(1.0, float(settings.CASE_TIME_LIMIT_SECONDS))


def handover_budget_seconds() -> float:
    return min(HANDOVER_BUDGET_SECONDS, case_time_limit_seconds() / 4)


def run_admitted_case(
    result_id: int, holder: str, *, keep_going: Callable[[], bool] = lambda: True
) -> None:
    """Run an admitted case, then keep running the cases its released slot hands over.

    1. Claim the case's lease for this worker (return if another delivery has it).
    2. Render, call the provider (with retries) and check the assertions, no transaction open.
    3. Record the result exactly once, give back the slot and promote the next case; if that
       was the run's last case, finish the run and hand its slot to the next run.
       From claim to record, the heartbeat renews the case's lease (inflight.holding).
    4. If `keep_going()` allowed it and the chain is younger than handover_budget_seconds(),
       a case promoted in 3. was kept for this thread instead of going through the broker: go
       on with it at 2.
    """
    lease_id = gate.claim_case(result_id, holder)
    chain_started, budget = time.monotonic(), handover_budget_seconds()
    run, case = None, None
    while lease_id is not None:
        young = time.monotonic() - chain_started < budget
        taken: list[gate.Admitted] = []
        try:
            with (
                inflight.holding(lease_id),
                admission.handing_over_to(holder if young and keep_going() else None) as taken,
            ):
                run = run_claimed_case(result_id, lease_id, run, case)
        except BaseException:
            # An interrupt after the hand-over: the case kept for this thread would never
            # start; it goes back to the queue now rather than when its lease runs out.
            for admitted in taken:
                hand_back_case(admitted.result_id, admitted.lease_id)
            raise
        if not taken:
            return
        result_id, lease_id, case = taken[0].result_id, taken[0].lease_id, taken[0].case
        if run is not None and taken[0].run_id != run.pk:
            run = None  # the slot went to another run's case: load that run with it


def run_claimed_case(
    result_id: int, lease_id: int, run: TestRun | None = None, case: dict | None = None
) -> TestRun | None:
    """Run a claimed case and record its outcome; never leaves it `running` with its lease
    held by this process. Raises only the interrupts it was given (time limit, shutdown),
    after recording or handing back the case. Returns the case's run (with its version and
    providers) for the next case of a hand-over chain: a run's settings do not change once it
    is launched, so a chain loads them once, and then only each case's own row, unless the
    hand-over brought its fields (`case`)."""
    # With DEBUG on, Django keeps every query of a connection until a request starts; a
    # worker thread never starts one.
    reset_queries()
    try:
        return _run_and_close(result_id, lease_id, run, case)
    except BaseException as exc:  # Exceptions are dealt with inside: these are interrupts
        _interrupted(result_id, lease_id, exc)
        raise


# What running a case reads from its result row; the rest of the row is what it writes.
CASE_FIELDS = ("run_id", "case_id", "position", "case_name", "variables", "assertions", "threshold")


def load_case(result_id: int, run: TestRun | None, case: dict | None = None) -> TestResult:
    """The result to run, with its run: only the case's own columns when `run` (the previous
    case's, in a chain) is the one it belongs to, and no query at all when the hand-over
    brought them (`case`). Compiling the query with the run, its version and providers
    joined in costs more CPU than running a fast case."""
    if run is not None and case is not None:
        return TestResult(pk=result_id, run=run, status=TestResult.Status.RUNNING, **case)
    if run is not None:
        result = TestResult.objects.only(*CASE_FIELDS).get(pk=result_id)
        if result.run_id == run.pk:  # as the admission said; a guard, not a second query
            result.run = run
            return result
    return TestResult.objects.select_related(
        "run__version", "run__provider", "run__grader_provider"
    ).get(pk=result_id)


def _run_and_close(
    result_id: int, lease_id: int, run: TestRun | None, case: dict | None
) -> TestRun | None:
    try:
        result = load_case(result_id, run, case)
    except Exception:
        log.exception("case %s could not be loaded; its lease goes to the sweeper", result_id)
        forsake(lease_id)
        return None
    run = result.run
    with log_context(run_id=run.pk, case_id=result.case_id):
        log.info("case started")
        try:
            with inflight.watching(lease_id) as lost:
                outcome = run_case(run, result, lost)
        except inflight.CaseAbandoned as exc:
            log.info("case abandoned: its lease is gone")
            keep_spent(run, result, getattr(exc, "spent", None))
            return run
        except Exception as exc:  # whatever nobody foresaw belongs to this case
            log.exception("case failed with an unexpected error")
            outcome = unexpected(exc)
        close_case(run, result, lease_id, outcome)
    return run


def _interrupted(result_id: int, lease_id: int, exc: BaseException) -> None:
    """An exception raised into this thread from outside (Dramatiq's time limit, shutdown)
    while it held a case. The time limit ends the case as ERROR: running it again would most
    likely hit the limit again. Anything else (shutdown) puts it back in the queue for
    another worker, as admission.hand_back does for a stopping process."""
    # Nothing may be handed over to a thread on its way out.
    with admission.handing_over_to(None):
        if isinstance(exc, TimeLimitExceeded):
            log.error("case %s: the worker's time limit was reached", result_id)
            try:
                result = TestResult.objects.select_related("run").get(pk=result_id)
            except Exception:
                log.exception(
                    "case %s could not be loaded; its lease goes to the sweeper", result_id
                )
                forsake(lease_id)
                return
            outcome = CaseOutcome(
                TestResult.Status.ERROR, {"error": "the worker's time limit was reached"}
            )
            close_case(result.run, result, lease_id, outcome)
        else:
            log.warning(
                "case %s interrupted (%s); it goes back to the queue", result_id, type(exc).__name__
            )
            hand_back_case(result_id, lease_id)


def run_case(run: TestRun, result: TestResult, lost: threading.Event | None = None) -> CaseOutcome:
    """Ask the model `run.repeats` times and check each answer; the case passes only when
    every repeat passes (pass^N).

    Every repeat's evidence is kept (`repeat_results`, when there is more than one), and the
    result's own output and assertion outcomes are those of the first repeat that did not
    pass, so that what the result shows is what its verdict rests on. Only the first repeat
    may be answered from the cache: repeats exist to sample the model's variance, and N copies
    of one cached answer would make pass^N the pass of a single answer. A grader that cannot
    answer makes the case an ERROR naming it, not a failure."""
    try:
        system = render_prompt(run.version.system_prompt, result.variables)
        prompt = render_prompt(run.version.template, result.variables)
    except Exception as exc:  # a template error belongs to this case, not the worker
        return CaseOutcome(TestResult.Status.ERROR, {"error": f"Template error: {exc}"})
    tracker = CallTracker(deadline=time.monotonic() + case_budget_seconds(run, result))
    repeats: list[Repeat] = []
    wanted = max(1, run.repeats)  # a row written behind the forms' backs may say 0
    try:
        grade = grader_for(run, tracker, lost)
        embed = embedder_for(run, tracker, lost)
        for number in range(wanted):
            if number:  # the previous repeat's call is done: progress moves with each call
                tracker.calls_counted += 1
                followups.later(lambda: count_call(run.pk))
            attempts_before = tracker.attempts
            completion, cached = generate(
                run, system, prompt, tracker, lost, use_cache=run.use_cache and number == 0
            )
            note_validating(run, result)
            cost = (
                Decimal(0)
                if cached
                else providers.cost_of(run.provider, completion.tokens_in, completion.tokens_out)
            )
            tracker.add_usage(completion, cost, cached)
            verdict = assertions.evaluate(
                result.assertions,
                output=completion.text,
                latency_ms=completion.latency_ms,
                cost=cost,
                threshold=result.threshold,
                grade=grade,
                embed=embed,
                variables=result.variables,
                prompt=prompt,
            )
            if lost is not None and lost.is_set():
                # A grader call given up on because the lease went: the assertion module saw
                # an exception and failed the assertion; the case is not ours to record.
                raise inflight.CaseAbandoned
            repeats.append(Repeat(completion, cached, verdict, tracker.attempts - attempts_before))
            if verdict.error:  # the grader could not answer: no use asking again
                break
    except providers.ProviderError as exc:
        fields = {"error": str(exc), "prompt": prompt, **repeat_fields(run, repeats)}
        return CaseOutcome(
            TestResult.Status.ERROR,
            {**fields, **tracker.fields()},
            throttled=tracker.throttled,
            notes=tracker.notes,
        )
    except inflight.CaseAbandoned as exc:
        # Its outcome is not ours to record; but if its run was cancelled, the calls it
        # finished were paid for, and recording.keep_spent keeps them on its result.
        exc.spent = CaseOutcome(
            TestResult.Status.SKIPPED,
            {"prompt": prompt, **repeat_fields(run, repeats), **tracker.fields()},
        )
        raise
    except Exception as exc:  # in the assertions, the grader, ...: still this case's result
        log.exception("case failed with an unexpected error")
        outcome = unexpected(exc, {"prompt": prompt, **tracker.fields()})
        return replace(outcome, throttled=tracker.throttled, notes=tracker.notes)
    # A repeat that failed before one whose grader could not answer is shown: pass^N is false
    # whatever the grader would have said.
    shown = next((r for r in repeats if not r.verdict.passed), repeats[-1])
    passes = sum(r.verdict.passed for r in repeats)
    if shown.verdict.error:
        status = TestResult.Status.ERROR
    elif passes == wanted:
        status = TestResult.Status.PASSED
    else:
        status = TestResult.Status.FAILED
    fields = {
        "prompt": prompt,
        "output": shown.completion.text,
        "latency_ms": shown.completion.latency_ms,
        "assertion_results": [o.as_dict() for o in shown.verdict.outcomes],
        "score": shown.verdict.score,
        "repeat_passes": passes,
        **repeat_fields(run, repeats),
        **tracker.fields(),
    }
    if shown.verdict.error:
        fields["error"] = shown.verdict.error
    return CaseOutcome(status, fields, throttled=tracker.throttled, notes=tracker.notes)


@dataclass
class Repeat:
    completion: providers.Completion
    cached: bool
    verdict: assertions.CaseVerdict
    attempts: int = 1  # the calls this repeat's answer took (retries included)

    def as_dict(self) -> dict:
        return {
            "output": self.completion.text,
            "passed": self.verdict.passed,
            "score": self.verdict.score,
            "assertion_results": [o.as_dict() for o in self.verdict.outcomes],
            "latency_ms": self.completion.latency_ms,
            "tokens_in": self.completion.tokens_in,
            "tokens_out": self.completion.tokens_out,
            "cached": self.cached,
            "attempts": self.attempts,
        }


def repeat_fields(run: TestRun, repeats: list[Repeat]) -> dict:
    """The repeats' evidence for the result: only with more than one repeat asked for (with
    one, the result's own fields are that repeat, and a copy would double what is stored)."""
    if run.repeats <= 1:
        return {}
    return {
        "repeat_results": [r.as_dict() for r in repeats],
        "repeat_passes": sum(r.verdict.passed for r in repeats),
    }


def case_budget_seconds(run: TestRun, result: TestResult) -> float:
    """How long a case may take: every model call it may make (each repeat's answer, its
    gradings and embeddings requests) timing out on every attempt, timeout x (max_retries + 1)
    each; and
    never more than the actor's time limit leaves a case that starts late in a hand-over
    chain. A vendor's Retry-After is waited for only while it fits in what is left."""
    specs = result.assertions if isinstance(result.assertions, list) else []
    gradings = sum(
        assertions.MODEL_CALLS.get(s.get("type"), 0) for s in specs if isinstance(s, dict)
    )
    calls = max(1, run.repeats) * (1 + gradings)
    budget = run.timeout_seconds * (run.max_retries + 1) * calls
    return min(budget, case_time_limit_seconds() - handover_budget_seconds())


def note_validating(run: TestRun, result: TestResult) -> None:
    """The run's phase turns from generating to validating once no case is left to send to
    the model, only checks of cases in flight (llm-rubric grading can take a while). Only the
    last wave of cases can make that true, so only they ask, as a follow-up (the case does
    not wait for it). Cosmetic: a failure is logged."""
    if result.position >= run.total_cases - run.max_concurrent_tests:
        followups.later(lambda: _note_validating(run.pk))


def _note_validating(run_id: int) -> None:
    try:
        TestRun.objects.filter(pk=run_id, phase=TestRun.Phase.GENERATING).filter(
            ~Exists(TestResult.objects.filter(run=run_id, status=TestResult.Status.PENDING))
        ).update(phase=TestRun.Phase.VALIDATING)
    except DatabaseError:
        log.warning("the run's phase could not be updated", exc_info=True)
