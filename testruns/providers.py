"""The one place that talks to LLMs. `complete(provider, ...)` returns a Completion or raises
ProviderError; callers never see vendor SDK types. Kinds: `openai` (any OpenAI-compatible
server: OpenAI, Ollama, vLLM, LM Studio, llama.cpp, OpenRouter), `anthropic`, `command` (a
local program) and `simulator`. SDK retries are off: retrying is the caller's decision, made
from `ProviderError.retryable` and `retry_after`.

The API key lives only in the environment variable the provider names, read at call time. It
never reaches a message, a log line or a returned object: vendor texts are redacted, and SDK
exceptions (their requests carry the Authorization header) are not chained onto ours.
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import os
import random
import shlex
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anthropic
import openai

from testruns.models import Provider

# Default parameters a provider may pass on. Anything else (a typo, a simulator knob, or a key
# that would change the shape of the answer, such as `stream`, `n` or `tools`) is left out.
OPENAI_PARAMETERS = frozenset(
    "temperature top_p max_tokens max_completion_tokens seed stop presence_penalty "
    "frequency_penalty logit_bias response_format reasoning_effort".split()
)
# Not in OpenAI's schema but understood by vLLM, llama.cpp and Ollama; sent as extra body.
OPENAI_EXTRA_PARAMETERS = frozenset({"top_k", "min_p", "repetition_penalty"})
# max_tokens is required by Anthropic and set on its own; the rest go in the body as given.
ANTHROPIC_PARAMETERS = frozenset({"temperature", "top_p", "top_k", "stop_sequences"})
ANTHROPIC_DEFAULT_MAX_TOKENS = 1024

NO_KEY = "not-needed"  # local servers want no key, but the SDKs refuse to start without one
VENDOR_MESSAGE_CHARS = 300
CONNECTION_TEST_PROMPT = "Reply with the word OK."
CONNECTION_TEST_TIMEOUT = 15.0
NOT_THE_API = "is the base URL right, and the model served there?"
EX_TEMPFAIL = 75  # sysexits.h: "temporary failure, try again later"


class ProviderError(Exception):
    """A call failed. `retryable` says whether trying again may help (429, 5xx, network);
    `status` is the HTTP status when there was one (a 429 also slows the provider down)."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        status: int | None = None,
    ):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


@dataclass
class Completion:
    text: str
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: float = 0.0


def cost_of(provider: Provider, tokens_in: int, tokens_out: int) -> Decimal:
    million = Decimal(1_000_000)
    return (
        provider.price_input_per_mtok * tokens_in + provider.price_output_per_mtok * tokens_out
    ) / million


def complete(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
    call = _CALLS.get(provider.kind)
    if call is None:
        raise ProviderError(f"unknown provider kind {provider.kind!r}")
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


def _call_openai(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
    key = _api_key(provider)
    params = provider.parameters or {}
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    try:
        response = _openai_client(provider.base_url, key).chat.completions.create(
            model=provider.model,
            messages=messages,  # type: ignore[arg-type]
            timeout=timeout,
            extra_body=_allowed(params, OPENAI_EXTRA_PARAMETERS) or None,
            **_allowed(params, OPENAI_PARAMETERS),
        )
    except openai.OpenAIError as exc:
        raise _vendor_error(exc, key=key, timeout=timeout) from None
    choices = getattr(response, "choices", None)  # a str when the server answered non-JSON
    if not choices:
        raise ProviderError(f"the answer has no choices; {NOT_THE_API}")
    text = choices[0].message.content or ""
    usage = response.usage
    return Completion(
        text,
        _count(usage and usage.prompt_tokens, system + prompt),
        _count(usage and usage.completion_tokens, text),
    )


def _call_anthropic(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
    key = _api_key(provider)
    params = provider.parameters or {}
    try:
        message = _anthropic_client(provider.base_url, key).messages.create(
            model=provider.model,
            max_tokens=int(params.get("max_tokens", ANTHROPIC_DEFAULT_MAX_TOKENS)),
            system=system or anthropic.omit,
            messages=[{"role": "user", "content": prompt}],
            # Given per request, it also skips the SDK's "use streaming" guess from max_tokens.
            timeout=timeout,
            extra_body=_allowed(params, ANTHROPIC_PARAMETERS) or None,
        )
    except anthropic.AnthropicError as exc:
        raise _vendor_error(exc, key=key, timeout=timeout) from None
    content = getattr(message, "content", None)
    if content is None:
        raise ProviderError(f"the answer has no content; {NOT_THE_API}")
    text = "".join(block.text for block in content if block.type == "text")
    usage = message.usage
    return Completion(
        text,
        _count(usage and usage.input_tokens, system + prompt),
        _count(usage and usage.output_tokens, text),
    )


def _call_command(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
    """Run the provider's program without a shell: prompt on stdin, answer on stdout, the
    system prompt in $PROMPT_SYSTEM.

    A timeout is not retryable: the same program on the same machine with the same input
    would most likely run as long again, so a retry only doubles the wait. A program that
    knows better exits with 75 (EX_TEMPFAIL), which is retryable.
    """
    try:
        args = shlex.split(provider.command)
    except ValueError as exc:
        raise ProviderError(f"the command cannot be parsed: {exc}") from None
    if not args:
        raise ProviderError("no command is configured")
    try:
        done = subprocess.run(
            args,
            input=prompt,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
            shell=False,
            env={**os.environ, "PROMPT_SYSTEM": system},
        )
    except subprocess.TimeoutExpired:
        raise ProviderError(f"command timed out after {timeout:.1f}s") from None
    except OSError as exc:  # not found, not executable
        raise ProviderError(f"command could not start: {args[0]}: {exc.strerror}") from None
    if done.returncode:
        how = f"status {done.returncode}" if done.returncode > 0 else f"signal {-done.returncode}"
        tail = done.stderr.strip()[-VENDOR_MESSAGE_CHARS:] or "(no output on stderr)"
        raise ProviderError(
            f"command exited with {how}: {tail}", retryable=done.returncode == EX_TEMPFAIL
        )
    text = done.stdout.strip()
    return Completion(text, _rough_tokens(system + prompt), _rough_tokens(text))


def _api_key(provider: Provider) -> str:
    """Read at call time, so a rotated key needs no restart."""
    if not provider.api_key_env:
        return NO_KEY
    key = os.environ.get(provider.api_key_env)
    if not key:
        raise ProviderError(
            f"the environment variable {provider.api_key_env} that should hold the API key "
            "is not set"
        )
    return key


# A client costs ~25 ms of CPU to build (its TLS context), so one is kept per (URL, key) and
# reuses its connections; the timeout is given per request. A rotated key gets a new client.
@functools.lru_cache(maxsize=32)
def _openai_client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url or None, api_key=key, max_retries=0)


@functools.lru_cache(maxsize=32)
def _anthropic_client(base_url: str, key: str) -> anthropic.Anthropic:
    # The SDK adds /v1 itself; OpenAI-style URLs include it, so a pasted one works too.
    base_url = base_url.rstrip("/").removesuffix("/v1")
    return anthropic.Anthropic(base_url=base_url or None, api_key=key, max_retries=0)


def _allowed(params: Mapping[str, Any], names: frozenset[str]) -> dict[str, Any]:
    return {name: value for name, value in params.items() if name in names}


def _vendor_error(exc: Exception, *, key: str, timeout: float) -> ProviderError:
    """Translate an SDK exception: 429, 408, 409, 5xx and network trouble are retryable."""
    if isinstance(exc, openai.APITimeoutError | anthropic.APITimeoutError):
        return ProviderError(f"timed out after {timeout:.1f}s", retryable=True)
    if isinstance(exc, openai.APIConnectionError | anthropic.APIConnectionError):
        reason = str(exc.__cause__ or exc) or type(exc).__name__
        return ProviderError(f"connection failed: {_redact(reason, key)}", retryable=True)
    if isinstance(exc, openai.APIStatusError | anthropic.APIStatusError):
        status = exc.status_code
        retry_after = _retry_after(exc.response.headers)
        if status == 429:
            wait = f" (retry after {retry_after:.1f}s)" if retry_after is not None else ""
            return ProviderError(
                f"HTTP 429 rate limited{wait}", retryable=True, retry_after=retry_after, status=429
            )
        retryable = status >= 500 or status in (408, 409)
        return ProviderError(
            f"HTTP {status}: {_redact(_vendor_message(exc), key)}",
            retryable=retryable,
            retry_after=retry_after if retryable else None,
            status=status,
        )
    return ProviderError(f"{type(exc).__name__}: {_redact(str(exc), key)}"[:400])


def _vendor_message(exc: openai.APIStatusError | anthropic.APIStatusError) -> str:
    """The vendor's own words from {"error": {"message": ...}} (OpenAI, Anthropic, vLLM; the
    OpenAI SDK unwraps "error" itself), {"error": "..."} (Ollama), or the raw body."""
    body = exc.body
    if isinstance(body, dict):
        body = body.get("error", body)
    if isinstance(body, dict):
        body = body.get("message") or body
    text = str(body or exc.response.reason_phrase or "no details").strip()
    if len(text) > VENDOR_MESSAGE_CHARS:
        return text[: VENDOR_MESSAGE_CHARS - 1] + "…"
    return text


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` (OpenAI's) or `Retry-After` (seconds or an HTTP date)."""
    try:
        return max(0.0, float(headers["retry-after-ms"]) / 1000)
    except (KeyError, ValueError):
        pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" parses as naive; HTTP dates are GMT anyway
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _redact(text: str, key: str) -> str:
    # Vendors echo a rejected key back ("Incorrect API key provided: sk-...").
    return text.replace(key, "[redacted]") if key and key != NO_KEY else text


def _simulate(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
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
        raise ProviderError(f"simulated call timed out after {timeout:.1f}s", retryable=True)
    time.sleep(latency / 1000)
    if random.random() < float(params.get("error_rate", 0)):
        raise ProviderError("simulated provider error (HTTP 500)", retryable=True, status=500)
    text = f"[simulated] {prompt.strip()}"
    return Completion(
        text=text, tokens_in=_rough_tokens(system + prompt), tokens_out=_rough_tokens(text)
    )


def _count(reported: int | None, text: str) -> int:
    """The vendor's token count, or an estimate when it reports none (some local servers)."""
    return reported if isinstance(reported, int) else _rough_tokens(text)


def _rough_tokens(text: str) -> int:
    return max(1, len(text) // 4)


_CALLS: dict[str, Callable[..., Completion]] = {
    Provider.Kind.OPENAI: _call_openai,
    Provider.Kind.ANTHROPIC: _call_anthropic,
    Provider.Kind.COMMAND: _call_command,
    Provider.Kind.SIMULATOR: _simulate,
}
