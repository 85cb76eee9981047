"""The one place that talks to LLMs. `complete(provider, ...)` returns a Completion or raises
ProviderError; callers never see vendor SDK types."""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from decimal import Decimal

from testruns.models import Provider


class ProviderError(Exception):
    """A call failed. `retryable` says whether trying again may help (429, 5xx, network)."""

    def __init__(self, message: str, *, retryable: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass
class Completion:
    text: str
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: float = 0.0


def cost_of(provider: Provider, tokens_in: int, tokens_out: int) -> Decimal:
    million = Decimal(1_000_000)
    return (provider.price_input_per_mtok * tokens_in
            + provider.price_output_per_mtok * tokens_out) / million


def complete(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
    started = time.perf_counter()
    call = _CALLS[provider.kind]
    completion = call(provider, system=system, prompt=prompt, timeout=timeout)
    completion.latency_ms = (time.perf_counter() - started) * 1000
    return completion


def _simulate(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
    """Deterministic fake: the same prompt always gets the same answer. The latency is real
    (it sleeps) so that queueing and concurrency behave as with a remote model."""
    params = provider.parameters or {}
    digest = hashlib.sha256(f"{system}\n{prompt}".encode()).digest()
    rng = random.Random(digest)
    latency = float(params.get("latency_ms", 200)) + rng.uniform(0, float(params.get("jitter_ms", 0)))
    if latency / 1000 > timeout:
        time.sleep(timeout)
        raise ProviderError(f"simulated call timed out after {timeout:.1f}s", retryable=True)
    time.sleep(latency / 1000)
    if random.random() < float(params.get("error_rate", 0)):
        raise ProviderError("simulated provider error (HTTP 500)", retryable=True)
    text = f"[simulated] {prompt.strip()}"
    return Completion(text=text, tokens_in=_rough_tokens(system + prompt),
                      tokens_out=_rough_tokens(text))


def _rough_tokens(text: str) -> int:
    return max(1, len(text) // 4)


_CALLS = {
    Provider.Kind.SIMULATOR: _simulate,
}
