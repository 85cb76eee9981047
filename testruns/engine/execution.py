"""Executing one admitted case, from claiming its lease to recording its result.

Work is at-least-once (a case whose worker died is run again), results exactly-once: a
result is written only while it is still `running`, by whichever execution gets there
first. No transaction is open while the provider is called.

Everything after the claim ends. Whatever the vendor answers, whatever the database refuses
and whatever exception nobody foresaw, a claimed case gets a result and gives back its slot:

- a provider failure of any kind is an ERROR result saying what went wrong;
- text the database cannot store (NUL, lone surrogates) is replaced with U+FFFD and numbers
  it cannot store are clamped, and the result says so;
- any other exception is an ERROR result naming it ("unexpected error: KeyError: 'x'");
- a failed write is retried on a fresh connection, then written as a bare ERROR; if even
  that fails (the database is gone), the lease is handed to the sweeper, because this
  process's heartbeat would otherwise keep it alive forever;
- the actor's time limit (an exception raised asynchronously in the thread) records the
  case as ERROR, other interrupts (shutdown) put it back in the queue, and both re-raise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import (
    DatabaseError,
    InterfaceError,
    OperationalError,
    connection,
    reset_queries,
    transaction,
)
from django.db.models import Exists
from django.db.models.functions import Now
from django.utils import timezone
from dramatiq.middleware.time_limit import TimeLimitExceeded

from testruns.catalog import assertions
from testruns.catalog.prompts import render_prompt
from testruns.engine import gate, inflight, providers
from testruns.live import events
from testruns.models import Provider, ResponseCache, TestResult, TestRun
from testruns.ops.log_context import log_context

log = logging.getLogger(__name__)

# A thread keeps the cases its freed slots hand over for at most this long (and at most a
# quarter of the actor's time limit), then sends the next one through the broker: a chain of
# cases, each well within the limit, must not add up to it.
HANDOVER_BUDGET_SECONDS = 60.0
# How long past its timeout a provider call is waited for (the SDK's timeout is per read, so
# a trickling server could otherwise hold the thread much longer).
CALL_GRACE_SECONDS = 10.0
# Writing a result: retries on a fresh connection after a connection error (PostgreSQL
# restarting), then the same for a bare ERROR outcome. About 11 s in all, then the sweeper.
RECORD_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)
BARE_RECORD_RETRY_DELAYS = (1.0, 2.0, 4.0)
ERROR_CHARS = 2000  # an exception's text can be anything; the result keeps its start
# The widest values the result and run columns take (integer, numeric(14, 6)).
MAX_INT_COLUMN = 2**31 - 1
MAX_COST = Decimal("99999999.999999")
# What PostgreSQL refuses in text and jsonb: NUL, and surrogates (in a Python str they can only
# be lone ones, from a JSON escape such as "\ud800"; psycopg cannot encode them).
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def case_time_limit_seconds() -> float:
    """The actor's time limit (CASE_TIME_LIMIT_SECONDS)."""
    return max(1.0, float(settings.CASE_TIME_LIMIT_SECONDS))


def handover_budget_seconds() -> float:
    return min(HANDOVER_BUDGET_SECONDS, case_time_limit_seconds() / 4)


@dataclass
class CaseOutcome:
    status: str
    fields: dict = field(default_factory=dict)
    throttled: bool = False
    # What the result should say about how it was stored (sanitised text, estimated tokens).
    notes: list[str] = field(default_factory=list)


def execute_case(result_id: int, holder: str, *, keep_going=lambda: True) -> None:
    """Run an admitted case, then keep running the cases its released slot hands over.

    1. Claim the case's lease for this worker (return if another delivery has it).
    2. Render, call the provider (with retries) and check the assertions, no transaction open.
    3. Record the result exactly once, give back the slot and promote the next case; if that
       was the run's last case, finish the run and hand its slot to the next run.
    4. If `keep_going()` allowed it and the chain is younger than handover_budget_seconds(),
       a case promoted in 3. was kept for this thread instead of going through the broker: go
       on with it at 2.
    """
    lease_id = gate.claim_case(result_id, holder)
    chain_started, budget = time.monotonic(), handover_budget_seconds()
    while lease_id is not None:
        young = time.monotonic() - chain_started < budget
        taken: list[gate.Admitted] = []
        try:
            with gate.handing_over_to(holder if young and keep_going() else None) as taken:
                run_claimed_case(result_id, lease_id)
        except BaseException:
            # An interrupt after the hand-over: the case kept for this thread would never
            # start, and this process's heartbeat would renew its lease forever.
            for admitted in taken:
                hand_back_case(admitted.result_id, admitted.lease_id)
            raise
        if not taken:
            return
        result_id, lease_id = taken[0].result_id, taken[0].lease_id


def run_claimed_case(result_id: int, lease_id: int) -> None:
    """Run a claimed case and record its outcome; never leaves it `running` with its lease
    held by this process. Raises only the interrupts it was given (time limit, shutdown),
    after recording or handing back the case."""
    # With DEBUG on, Django keeps every query of a connection until a request starts; a
    # worker thread never starts one.
    reset_queries()
    try:
        _run_and_close(result_id, lease_id)
    except BaseException as exc:  # Exceptions are dealt with inside: these are interrupts
        _interrupted(result_id, lease_id, exc)
        raise


def _run_and_close(result_id: int, lease_id: int) -> None:
    try:
        result = TestResult.objects.select_related(
            "run__version", "run__provider", "run__grader_provider"
        ).get(pk=result_id)
    except Exception:
        log.exception("case %s could not be loaded; its lease goes to the sweeper", result_id)
        forsake(lease_id)
        return
    run = result.run
    with log_context(run_id=run.pk, case_id=result.case_id):
        log.info("case started")
        try:
            with inflight.watching(lease_id) as lost:
                outcome = run_case(run, result, lost)
        except inflight.CaseAbandoned:
            log.info("case abandoned: its lease is gone")
            return
        except Exception as exc:  # whatever nobody foresaw belongs to this case
            log.exception("case failed with an unexpected error")
            outcome = unexpected(exc)
        close_case(run, result, lease_id, outcome)


def _interrupted(result_id: int, lease_id: int, exc: BaseException) -> None:
    """An exception raised into this thread from outside (Dramatiq's time limit, shutdown)
    while it held a case. The time limit ends the case as ERROR: running it again would most
    likely hit the limit again. Anything else (shutdown) puts it back in the queue for
    another worker, as gate.hand_back does for a stopping process."""
    # Nothing may be handed over to a thread on its way out.
    with gate.handing_over_to(None):
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


def unexpected(exc: BaseException, fields: dict | None = None) -> CaseOutcome:
    message = f"unexpected error: {type(exc).__name__}: {exc}"
    return CaseOutcome(TestResult.Status.ERROR, {**(fields or {}), "error": message[:ERROR_CHARS]})


def run_case(run: TestRun, result: TestResult, lost=None) -> CaseOutcome:
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
        for number in range(wanted):
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
            )
            if lost is not None and lost.is_set():
                # A grader call given up on because the lease went: the assertion module saw
                # an exception and failed the assertion; the case is not ours to record.
                raise inflight.CaseAbandoned
            repeats.append(Repeat(completion, cached, verdict))
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
    except inflight.CaseAbandoned:
        raise  # its outcome would be thrown away: nothing to record
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
    """How long a case may take: every model call it may make (each repeat's answer and its
    llm-rubric gradings) timing out on every attempt, timeout x (max_retries + 1) each; and
    never more than the actor's time limit leaves a case that starts late in a hand-over
    chain. A vendor's Retry-After is waited for only while it fits in what is left."""
    specs = result.assertions if isinstance(result.assertions, list) else []
    gradings = sum(1 for s in specs if isinstance(s, dict) and s.get("type") == "llm-rubric")
    calls = max(1, run.repeats) * (1 + gradings)
    budget = run.timeout_seconds * (run.max_retries + 1) * calls
    return min(budget, case_time_limit_seconds() - handover_budget_seconds())


def note_validating(run: TestRun, result: TestResult) -> None:
    """The run's phase turns from generating to validating once no case is left to send to
    the model, only checks of cases in flight (llm-rubric grading can take a while). Only the
    last wave of cases can make that true, so only they ask. Cosmetic: a failure is logged."""
    if result.position < run.total_cases - run.max_concurrent_tests:
        return
    try:
        TestRun.objects.filter(pk=run.pk, phase=TestRun.Phase.GENERATING).filter(
            ~Exists(TestResult.objects.filter(run=run.pk, status=TestResult.Status.PENDING))
        ).update(phase=TestRun.Phase.VALIDATING)
    except DatabaseError:
        log.warning("the run's phase could not be updated", exc_info=True)


@dataclass
class CallTracker:
    """What a case's calls added up to: its own attempts, the tokens and cost of its answers
    and gradings, whether its provider said 429, and its time budget (a monotonic deadline)."""

    attempts: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: Decimal = Decimal(0)
    cached: bool = False
    throttled: bool = False
    notes: list[str] = field(default_factory=list)
    deadline: float = math.inf

    def add_usage(self, completion: providers.Completion, cost: Decimal, cached: bool) -> None:
        self.tokens_in += completion.tokens_in
        self.tokens_out += completion.tokens_out
        self.cost += cost
        self.cached = self.cached or cached
        self.notes += [note for note in completion.notes if note not in self.notes]

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def fields(self) -> dict:
        return {
            "attempts": self.attempts,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost": self.cost,
            "cached": self.cached,
        }


def generate(
    run: TestRun,
    system: str,
    prompt: str,
    tracker: CallTracker,
    lost=None,
    *,
    use_cache: bool | None = None,
) -> tuple[providers.Completion, bool]:
    """The model's answer, from the cache when `use_cache` (default: the run's setting)
    allows it. Errors are never cached; a cached answer keeps the latency it was measured
    with. Text the database cannot store is replaced here, before the assertions see it and
    before it is cached."""
    use_cache = run.use_cache if use_cache is None else use_cache
    key = cache_key(run.provider, system, prompt) if use_cache else None
    if key and (hit := ResponseCache.objects.filter(key=key).first()):
        return providers.Completion(hit.text, hit.tokens_in, hit.tokens_out, hit.latency_ms), True
    completion = call_with_retries(run, system, prompt, tracker, lost)
    completion.text, replaced = storable_text(completion.text)
    if replaced:
        completion.notes.append(unstorable_note("output", replaced))
    if key:
        try:
            ResponseCache.objects.get_or_create(
                key=key,
                defaults={
                    "text": completion.text,
                    "tokens_in": completion.tokens_in,
                    "tokens_out": completion.tokens_out,
                    "latency_ms": completion.latency_ms,
                },
            )
        except DatabaseError:  # a cache that cannot be written is only a missed saving
            log.warning("the answer could not be cached", exc_info=True)
    return completion, False


def cache_key(provider: Provider, system: str, prompt: str) -> str:
    material = json.dumps(
        [
            provider.pk,
            provider.kind,
            provider.model,
            provider.base_url,
            provider.parameters,
            system,
            prompt,
        ],
        sort_keys=True,
    )
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()


def call_with_retries(
    run: TestRun,
    system: str,
    prompt: str,
    tracker: CallTracker,
    lost=None,
    *,
    provider: Provider | None = None,
) -> providers.Completion:
    """Call `provider` (default: the run's), retrying 429s, 5xx and network errors up to the
    run's max_retries with exponential backoff and full jitter, or after the vendor's
    Retry-After when it sends one and the case has that much time left (else the case ends
    at once, saying how long the vendor asked for). A 429 also halves the provider's
    effective concurrency, once per window (gate.throttle_provider). Raises CaseAbandoned as
    soon as the case's lease is lost (`lost` is set). An attempt is waited for at most its
    timeout and CALL_GRACE_SECONDS. Only the run's own provider's calls count as the case's
    attempts and as its throttling."""
    provider = provider or run.provider
    own = provider.pk == run.provider_id
    for attempt in range(run.max_retries + 1):
        if own:
            tracker.attempts += 1
        sent = time.monotonic()
        try:
            return call_provider(run, system, prompt, lost, provider=provider)
        except providers.ProviderError as exc:
            if exc.status == 429:
                tracker.throttled = tracker.throttled or own
                try:
                    gate.throttle_provider(provider.pk, time.monotonic() - sent)
                except DatabaseError:  # slowing down is a courtesy; the retry still waits
                    log.warning("the provider could not be throttled", exc_info=True)
            if not exc.retryable or attempt == run.max_retries:
                raise
            left = tracker.seconds_left()
            if exc.retry_after is not None and exc.retry_after > left:
                raise providers.ProviderError(
                    f"the vendor asked to retry after {_seconds(exc.retry_after)}, more than "
                    f"the {_seconds(left)} this case has left",
                    kind=exc.kind,
                    status=exc.status,
                ) from None
            # Our own backoff is a guess, not a request: it is shortened to fit instead.
            delay = exc.retry_after if exc.retry_after is not None else min(backoff(attempt), left)
            log.info("retrying after %.2fs: %s", delay, exc, extra={"run_id": run.pk})
            inflight.wait(delay, lost)
    raise AssertionError("unreachable")


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 or value == int(value) else f"{value:.1f} s"


def call_provider(
    run: TestRun, system: str, prompt: str, lost=None, *, provider: Provider | None = None
) -> providers.Completion:
    provider, timeout = provider or run.provider, run.timeout_seconds
    try:
        return inflight.call(
            lambda: providers.complete(provider, system=system, prompt=prompt, timeout=timeout),
            lost,
            timeout=timeout + CALL_GRACE_SECONDS,
        )
    except inflight.CallOverran:
        raise providers.ProviderError(
            f"timed out after {timeout:.1f}s", kind=providers.Kind.TIMEOUT, retryable=True
        ) from None


def backoff(attempt: int, base: float = 0.5, cap: float = 20.0) -> float:
    return random.uniform(0, min(cap, base * 2**attempt))


GRADER_SYSTEM_PROMPT = "You are a strict, fair grader."


def grader_for(run: TestRun, tracker: CallTracker | None = None, lost=None) -> assertions.Grade:
    """How `llm-rubric` asks a model: the run's grader provider (pinned at launch from the
    card, or named by the launch), else the run's own provider.

    A grading call is made like a generation call: the run's timeout and retries, Retry-After
    within the case's budget, abandoned when the lease is lost; its tokens and cost (at the
    grader's prices) are added to the case's and so to the run's. Its answer is never cached.
    A grader that cannot answer raises assertions.GradingError naming it, which makes the
    assertion, and the case, an ERROR rather than a failure of the model being tested.

    Grading calls ride on the generating case's call slot: they are not counted against the
    grader provider's own concurrency limit. Taking a second slot mid-case would mean waiting
    for it in a worker thread while holding the first (slots are handed over by promotion,
    never polled for), and two runs grading with each other's providers could then hold each
    other's slots forever. The grader's 429s still lower its ceiling (for its own runs)."""
    tracker = tracker if tracker is not None else CallTracker()
    provider = run.grader_provider or run.provider
    label = str(provider.name) + (f" ({provider.model})" if provider.model else "")

    def grade(grading_prompt: str) -> str:
        try:
            completion = call_with_retries(
                run, GRADER_SYSTEM_PROMPT, grading_prompt, tracker, lost, provider=provider
            )
        except providers.ProviderError as exc:
            raise assertions.GradingError(f"the grader {label} could not answer: {exc}") from None
        cost = providers.cost_of(provider, completion.tokens_in, completion.tokens_out)
        tracker.add_usage(completion, cost, cached=False)
        return completion.text

    return grade


# --- Storing what the database can store ----------------------------------------------------


def storable_text(text: str) -> tuple[str, int]:
    """The text with NUL and lone surrogates replaced by U+FFFD, and how many there were."""
    return UNSTORABLE.subn("\ufffd", text)


def unstorable_note(what: str, count: int) -> str:
    plural = "s" if count > 1 else ""
    return (
        f"the {what} held {count} character{plural} the database cannot store (NUL or a "
        "lone surrogate), stored as U+FFFD"
    )


def _storable_json(value: Any) -> tuple[Any, int]:
    """A JSON value with its strings (keys too) made storable and non-finite numbers (which
    jsonb refuses) made null; returns how many things were changed."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None, 1
    if isinstance(value, list | tuple):
        pairs = [_storable_json(item) for item in value]
        return [item for item, _ in pairs], sum(n for _, n in pairs)
    if isinstance(value, dict):
        changed, clean = 0, {}
        for key, item in value.items():
            key, n = storable_text(str(key))
            clean[key], m = _storable_json(item)
            changed += n + m
        return clean, changed
    return value, 0


FIELD_NAMES = {
    "output": "output",
    "prompt": "prompt",
    "error": "error message",
    "assertion_results": "assertion results",
    "repeat_results": "repeat results",
}


def storable(outcome: CaseOutcome) -> CaseOutcome:
    """The outcome as the database will take it: text without NUL or lone surrogates, token
    counts and cost within their columns and never negative, and the notes written into the
    result (into `error` for an ERROR, as a note entry among the assertion results otherwise,
    so the report still shows the output)."""
    fields, notes = dict(outcome.fields), list(outcome.notes)
    for name, what in FIELD_NAMES.items():
        if name in fields:
            fields[name], replaced = _storable_json(fields[name])
            if replaced:
                notes.append(unstorable_note(what, replaced))
    for name in ("tokens_in", "tokens_out", "attempts", "repeat_passes"):
        if name in fields and not 0 <= fields[name] <= MAX_INT_COLUMN:
            notes.append(
                f"{name} was {fields[name]}, out of range; stored as "
                f"{min(max(fields[name], 0), MAX_INT_COLUMN)}"
            )
            fields[name] = min(max(fields[name], 0), MAX_INT_COLUMN)
    if "cost" in fields and not Decimal(0) <= fields["cost"] <= MAX_COST:
        notes.append(
            f"the cost was {fields['cost']}, out of range; stored as the nearest "
            "value the column holds"
        )
        fields["cost"] = min(max(fields["cost"], Decimal(0)), MAX_COST)
    if "score" in fields and isinstance(fields["score"], float) and math.isnan(fields["score"]):
        fields["score"] = None
    if notes:
        notes = [storable_text(note)[0] for note in dict.fromkeys(notes)]
        if outcome.status == TestResult.Status.ERROR or "assertion_results" not in fields:
            fields["error"] = "\n".join([fields.get("error", ""), *(f"Note: {n}" for n in notes)])
            fields["error"] = fields["error"].strip()
        else:
            fields["assertion_results"] = [
                *fields["assertion_results"],
                *(
                    {"type": "note", "passed": True, "score": 1.0, "reason": n, "weight": 0.0}
                    for n in notes
                ),
            ]
    return replace(outcome, fields=fields, notes=[])


# --- Recording ------------------------------------------------------------------------------


def close_case(run: TestRun, result: TestResult, lease_id: int, outcome: CaseOutcome) -> None:
    """Record the outcome and give back the slot, whatever the database says: the outcome as
    it is (retried after connection errors), else a bare ERROR, else hand the lease to the
    sweeper. Then finish the run if that was its last case. Never raises an Exception."""
    try:
        outcome = storable(outcome)
    except Exception as exc:  # a bug in the cleaning must not keep the case open either
        log.exception("the outcome could not be made storable")
        outcome = unexpected(exc)
    complete, failure = record_with_retries(run, result, lease_id, outcome, RECORD_RETRY_DELAYS)
    if complete is None:
        bare = bare_outcome(outcome, failure)
        complete, failure = record_with_retries(
            run, result, lease_id, bare, BARE_RECORD_RETRY_DELAYS
        )
        if complete is not None:
            log.warning("case %s recorded as a bare error: %s", result.pk, bare.fields["error"])
    if complete is None:
        log.error(
            "case %s: no outcome could be written (%s); its lease goes to the sweeper",
            result.pk,
            failure,
        )
        forsake(lease_id)
        return
    if complete:
        try:
            finish_run(run.pk)
        except Exception:  # the sweeper finishes runs whose every case is done
            log.exception("the run could not be finished; the sweeper will")
            fresh_connection()


def record_with_retries(
    run: TestRun, result: TestResult, lease_id: int, outcome: CaseOutcome, delays: tuple[float, ...]
) -> tuple[bool | None, str]:
    """record_case, again after each delay while the connection fails (a new connection each
    time). Returns (record_case's answer, "") or (None, why it could not be written): at
    once when the database refused the values, since the same values would be refused again."""
    failure = ""
    for delay in (0.0, *delays):
        if delay:
            time.sleep(delay)  # the database is restarting or unreachable: give it a moment
        try:
            return record_case(run, result, lease_id, outcome), ""
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}".strip()
            fresh_connection()
            if not isinstance(exc, OperationalError | InterfaceError):
                # DataError, IntegrityError, an encoding error: the values were refused.
                log.exception("case %s: the database refused the result", result.pk)
                return None, failure
            log.warning("case %s: writing the result failed (%s); trying again", result.pk, failure)
    return None, failure


def bare_outcome(outcome: CaseOutcome, failure: str) -> CaseOutcome:
    """Status and error text only: what is left to say when the full outcome was refused."""
    was = "" if outcome.status == TestResult.Status.ERROR else f" (it had {outcome.status})"
    error = f"the result could not be saved{was}: {failure}\n{outcome.fields.get('error', '')}"
    return CaseOutcome(
        TestResult.Status.ERROR, {"error": storable_text(error.strip()[:ERROR_CHARS])[0]}
    )


def fresh_connection() -> None:
    """Drop this thread's connection so the next query opens a new one. Not inside a
    transaction (a test's): closing there would break the transaction, not mend it."""
    if connection.in_atomic_block:
        return
    try:
        connection.close()
    except Exception:  # it was broken anyway
        pass


def forsake(lease_id: int) -> None:
    """Give the case up to the sweeper: its lease loses its holder (this process's heartbeat
    no longer renews it) and expires now, so the next sweep puts the case back in the queue.
    With the database away, the lease is remembered and handed over once it answers
    (inflight.release_forsaken, from the sweep thread)."""
    try:
        fresh_connection()
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE testruns_lease SET holder = '', expires_at = now() "
                "WHERE id = %s AND result_id IS NOT NULL",
                [lease_id],
            )
    except Exception:
        log.warning(
            "lease %s cannot be handed back yet; trying again on the next sweep",
            lease_id,
            exc_info=True,
        )
        inflight.forsake_later(lease_id)


def hand_back_case(result_id: int, lease_id: int) -> None:
    """Put a claimed case back in the queue at once (pending, slot given back, waiters
    promoted), as gate.hand_back does for a stopping process; if the database is away, to
    the sweeper. Never raises an Exception."""
    try:
        provider_id = (
            TestRun.objects.filter(results=result_id).values_list("provider_id", flat=True).first()
        )
        with transaction.atomic():
            if provider_id is not None:
                given = gate.give_back_case(provider_id, lease_id, succeeded=False)
                if given.held:  # else it was reclaimed and may be running elsewhere now
                    TestResult.objects.filter(
                        pk=result_id, status=TestResult.Status.RUNNING
                    ).update(status=TestResult.Status.PENDING)
                gate.admit_next_cases(provider_id, given.locked)
    except Exception:
        log.exception("case %s could not be handed back; its lease goes to the sweeper", result_id)
        forsake(lease_id)


STOPPING = (TestResult.Status.FAILED, TestResult.Status.ERROR)
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
        given = gate.give_back_case(
            run.provider_id,
            lease_id,
            succeeded=(outcome.status != TestResult.Status.ERROR and not outcome.throttled),
        )
        written = 0
        if given.held:
            written = TestResult.objects.filter(
                pk=result.pk, status=TestResult.Status.RUNNING
            ).update(status=outcome.status, finished_at=timezone.now(), **outcome.fields)
        else:
            log.warning(
                "the case's lease was taken back before its result was recorded (it was "
                "reclaimed or cancelled, and may have run elsewhere); outcome discarded"
            )
        complete = False
        if written:
            skipped = 0
            # An error stops the run as a failure does: either way the case did not pass.
            if run.stop_on_failure and outcome.status in STOPPING:
                skipped = TestResult.objects.filter(
                    run=run, status=TestResult.Status.PENDING
                ).update(status=TestResult.Status.SKIPPED, finished_at=timezone.now())
            totals = add_to_totals(run.pk, outcome, skipped)
            complete = totals["done_count"] >= totals["total_cases"]
            events.announce(run.pk, kind="progress", force=False)
        gate.admit_next_cases(run.provider_id, given.locked)
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
            [
                skipped,
                outcome.fields.get("tokens_in", 0),
                outcome.fields.get("tokens_out", 0),
                outcome.fields.get("cost", 0),
                run_id,
            ],
        )
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
