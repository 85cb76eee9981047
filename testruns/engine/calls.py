"""Asking the model for a case: one call waited for at most its timeout and a grace period
(and abandoned when the case's lease is lost), retried after 429s, 5xx and network errors with
backoff or after the vendor's Retry-After while the case's budget allows, answered from the
response cache when the run allows it; the grader that model-graded assertions ask, and the
embeddings that `similar` asks for. A
CallTracker adds up what a case's calls cost (attempts, tokens, cost, throttling)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db import DatabaseError

from testruns.catalog import assertions
from testruns.engine import gate, inflight, providers
from testruns.engine.recording import storable_text, unstorable_note
from testruns.models import Provider, ResponseCache, TestRun

log = logging.getLogger(__name__)

# How long past its timeout a provider call is waited for (the SDK's timeout is per read, so
# a trickling server could otherwise hold the thread much longer).
CALL_GRACE_SECONDS = 10.0


@dataclass
class CallTracker:
    """What a case's calls added up to: its own attempts, the tokens and cost of its answers
    and gradings, whether its provider said 429, and its time budget (a monotonic deadline)."""

    attempts: int = 0
    retries: int = 0
    # Calls of this case already added to the run's calls_done while it ran (repeats).
    calls_counted: int = 0
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
            "retries": self.retries,
            "calls_counted": self.calls_counted,
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
    lost: threading.Event | None = None,
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
    lost: threading.Event | None = None,
    *,
    provider: Provider | None = None,
    call: Callable[[], Any] | None = None,
) -> Any:
    """Call `provider` (default: the run's), or make `call` (an embeddings request), retrying
    429s, 5xx and network errors up to the run's max_retries with exponential backoff and
    full jitter, or after the vendor's Retry-After when it sends one and the case has that
    much time left (else the case ends at once, saying how long the vendor asked for). A 429
    also halves the provider's effective concurrency, once per window
    (gate.throttle_provider). Raises CaseAbandoned as soon as the case's lease is lost
    (`lost` is set). An attempt is waited for at most its timeout and CALL_GRACE_SECONDS.
    Only the run's own provider's calls count as the case's attempts and as its throttling."""
    provider = provider or run.provider
    own = provider.pk == run.provider_id
    for attempt in range(run.max_retries + 1):
        if own:
            tracker.attempts += 1
            tracker.retries += attempt > 0
        sent = time.monotonic()
        try:
            if call is not None:
                return _within_timeout(run, call, lost)
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
    run: TestRun,
    system: str,
    prompt: str,
    lost: threading.Event | None = None,
    *,
    provider: Provider | None = None,
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


def _within_timeout(run: TestRun, call: Callable[[], Any], lost: threading.Event | None) -> Any:
    timeout = run.timeout_seconds
    try:
        return inflight.call(call, lost, timeout=timeout + CALL_GRACE_SECONDS)
    except inflight.CallOverran:
        raise providers.ProviderError(
            f"timed out after {timeout:.1f}s", kind=providers.Kind.TIMEOUT, retryable=True
        ) from None


def backoff(attempt: int, base: float = 0.5, cap: float = 20.0) -> float:
    return random.uniform(0, min(cap, base * 2**attempt))


GRADER_SYSTEM_PROMPT = "You are a strict, fair grader."


def grader_for(
    run: TestRun, tracker: CallTracker | None = None, lost: threading.Event | None = None
) -> assertions.Grade:
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


def embedder_for(
    run: TestRun, tracker: CallTracker | None = None, lost: threading.Event | None = None
) -> assertions.Embed:
    """How `similar` and `answer-relevance` get embeddings: from the grader's provider, as
    `grader_for` grades (the run's timeout and retries, abandoned when the lease is lost, its
    input tokens and cost added to the case's). One that cannot answer raises GradingError."""
    tracker = tracker if tracker is not None else CallTracker()
    provider = run.grader_provider or run.provider
    label = str(provider.name)

    def embed(texts: list[str]) -> list[list[float]]:
        timeout = run.timeout_seconds
        try:
            result = call_with_retries(
                run,
                "",
                "",
                tracker,
                lost,
                provider=provider,
                call=lambda: providers.embed(provider, texts, timeout=timeout),
            )
        except providers.ProviderError as exc:
            raise assertions.GradingError(
                f"the embeddings provider {label} could not answer: {exc}"
            ) from None
        usage = providers.Completion("", tokens_in=result.tokens_in)
        tracker.add_usage(usage, providers.cost_of(provider, result.tokens_in, 0), cached=False)
        return result.vectors

    return embed
