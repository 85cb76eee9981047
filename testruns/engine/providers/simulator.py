"""The `simulator` kind: the built-in fake model, for trying the app with no vendor at all."""

from __future__ import annotations

import hashlib
import random
import time

from testruns.engine.providers.completion import Completion, Kind, ProviderError, rough_tokens
from testruns.models import Provider


def simulate(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
    """Deterministic fake: the same prompt always gets the same answer. The latency is real
    (it sleeps) so that queueing and concurrency behave as with a remote model."""
    params = provider.parameters or {}
    digest = hashlib.sha256(f"{system}\n{prompt}".encode()).digest()
    rng = random.Random(digest)
    latency = float(params.get("latency_ms", 200)) + rng.uniform(
        0, float(params.get("jitter_ms", 0))
    )
    if latency / 1000 > timeout:
        time.sleep(timeout)
        raise ProviderError(
            f"simulated call timed out after {timeout:.1f}s", kind=Kind.TIMEOUT, retryable=True
        )
    time.sleep(latency / 1000)
    if random.random() < float(params.get("error_rate", 0)):
        raise ProviderError(
            "simulated provider error (HTTP 500)",
            kind=Kind.SERVER_ERROR,
            retryable=True,
            status=500,
        )
    text = f"[simulated] {prompt.strip()}"
    return Completion(
        text=text, tokens_in=rough_tokens(system + prompt), tokens_out=rough_tokens(text)
    )
