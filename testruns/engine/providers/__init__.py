"""The one place that talks to LLMs. `complete(provider, ...)` returns a Completion or raises
ProviderError; callers never see vendor SDK types. Kinds: `openai` (any OpenAI-compatible
server: OpenAI, Ollama, vLLM, LM Studio, llama.cpp, OpenRouter), `anthropic`, `command` (a
local program) and `simulator`. SDK retries are off: retrying is the caller's decision, made
from `ProviderError.retryable` and `retry_after`.

The API key lives only in the environment variable the provider names, read at call time. It
never reaches a message, a log line or a returned object: vendor texts are redacted, and SDK
exceptions (their requests carry the Authorization header) are not chained onto ours.

Nothing a vendor sends is trusted: the body is read through a transport that refuses more than
VENDOR_MAX_RESPONSE_BYTES, parsed here (not by the SDK) and checked for the shape of a
completion, and usage numbers outside what a real call can report are replaced by an estimate.
Every failure is a ProviderError with a `kind`, never a stray JSONDecodeError or AttributeError.

The modules, each imported by its full name (callers use only what this one exports):

- completion: Completion, ProviderError and its Kind, cost_of;
- transport: BoundedTransport (the size and time bound on an answer), the HTTP client, proxies;
- keys: the API key, read at call time, and its redaction;
- vendor_http: what the two HTTP kinds share (answer checks, SDK errors to ProviderErrors);
- openai_compatible, anthropic_messages, command, simulator: one kind each;
- embeddings: vectors for the `similar` assertions (OpenAI-compatible, or simulated).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from testruns.engine.providers.anthropic_messages import call_anthropic
from testruns.engine.providers.command import call_command
from testruns.engine.providers.completion import Completion, Kind, ProviderError, cost_of
from testruns.engine.providers.embeddings import Embeddings, embed, hashed_bag_of_words
from testruns.engine.providers.openai_compatible import call_openai
from testruns.engine.providers.simulator import simulate
from testruns.engine.providers.transport import STREAM_GRACE_SECONDS
from testruns.models import Provider

__all__ = [
    "STREAM_GRACE_SECONDS",
    "Completion",
    "Embeddings",
    "Kind",
    "ProviderError",
    "complete",
    "cost_of",
    "embed",
    "hashed_bag_of_words",
    "test_connection",
]

CONNECTION_TEST_PROMPT = "Reply with the word OK."
CONNECTION_TEST_TIMEOUT = 15.0

_CALLS: dict[str, Callable[..., Completion]] = {
    Provider.Kind.OPENAI: call_openai,
    Provider.Kind.ANTHROPIC: call_anthropic,
    Provider.Kind.COMMAND: call_command,
    Provider.Kind.SIMULATOR: simulate,
}


def complete(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
    """The provider's answer to one prompt, with the latency of the whole call; raises
    ProviderError (Kind.CONFIG for a kind nobody knows)."""
    call = _CALLS.get(provider.kind)
    if call is None:
        raise ProviderError(f"unknown provider kind {provider.kind!r}", kind=Kind.CONFIG)
    started = time.perf_counter()
    completion = call(provider, system=system, prompt=prompt, timeout=timeout)
    completion.latency_ms = (time.perf_counter() - started) * 1000
    return completion


def test_connection(provider: Provider) -> str:
    """Send one tiny prompt and return the answer; raises ProviderError. For the admin action,
    so it waits at most CONNECTION_TEST_TIMEOUT even when the provider allows longer."""
    timeout = min(provider.timeout_seconds or CONNECTION_TEST_TIMEOUT, CONNECTION_TEST_TIMEOUT)
    return complete(provider, system="", prompt=CONNECTION_TEST_PROMPT, timeout=timeout).text


test_connection.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported
