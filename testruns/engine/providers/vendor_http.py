"""What the two HTTP kinds (OpenAI-compatible and Anthropic) share: the parameters passed
on, the body of an answer parsed here (not by the SDK) and checked for the shape of a
completion, usage numbers outside what a real call can report replaced by an estimate, and SDK
exceptions turned into ProviderErrors of the right Kind (never chained: their requests carry
the Authorization header)."""

from __future__ import annotations

import email.utils
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import anthropic
import httpx2
import openai

from testruns.engine.providers.completion import (
    VENDOR_MESSAGE_CHARS,
    Completion,
    Kind,
    ProviderError,
    rough_tokens,
)
from testruns.engine.providers.keys import redact
from testruns.engine.providers.transport import RefusedAnswer

NOT_THE_API = "is the base URL right, and the model served there?"

# A usage number above this is not a count of anything a call did (a billion tokens); it is
# replaced by an estimate, like a negative or fractional one.
MAX_TRUSTED_TOKENS = 10**9


def allowed_parameters(params: Mapping[str, Any], names: frozenset[str]) -> dict[str, Any]:
    """The provider's default parameters that this kind passes on; the rest are left out."""
    return {name: value for name, value in params.items() if name in names}


def unsendable() -> ProviderError:
    # Sending it with U+FFFD instead would test a prompt other than the one written.
    return ProviderError(
        "the prompt cannot be sent: it holds a lone surrogate (such as \\ud800), which is "
        "not text any vendor can read",
        kind=Kind.CLIENT_ERROR,
    )


def json_answer(response: httpx2.Response, what: str, key: str) -> dict[str, Any]:
    """The body of a successful answer as a JSON object, or a ProviderError saying what came
    instead. Not retryable: an HTML page or junk with status 200 almost always means a wrong
    base URL (a web page, a proxy's login page), which asking again does not change."""
    body = response.content
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser
        data = None
    if isinstance(data, dict) and "error" in data and not ({"choices", "content"} & set(data)):
        # Some gateways (OpenRouter) report an upstream failure as an error object in a 200.
        error = data["error"]
        message = error.get("message") if isinstance(error, dict) else error
        text = redact(str(message or "no details"), key)[:VENDOR_MESSAGE_CHARS]
        raise ProviderError(
            f"the vendor answered with an error: {text}", kind=Kind.SERVER_ERROR, retryable=True
        )
    if not isinstance(data, dict):
        content_type = response.headers.get("content-type", "").split(";")[0].strip()
        raise ProviderError(
            f"the vendor answered with something that is not {what} "
            f"({content_type or 'no content type'}, {len(body):,} bytes); {NOT_THE_API}",
            kind=Kind.BAD_RESPONSE,
        )
    return data


def usage_of(data: dict[str, Any], completion: Completion) -> dict[str, Any]:
    usage = data.get("usage")
    if usage is None:
        return {}
    if not isinstance(usage, dict):
        completion.notes.append(f"the vendor's usage is {json_type(usage)}, not an object")
        return {}
    return usage


def token_count(reported: Any, text: str, what: str, completion: Completion) -> int:
    """The vendor's token count, or an estimate when it reports none (some local servers) or
    one no call can have used (negative, fractional, a string, over MAX_TRUSTED_TOKENS): such a
    number would corrupt the totals, make a negative cost or overflow the column."""
    if reported is None:
        return rough_tokens(text)
    if type(reported) is int and 0 <= reported <= MAX_TRUSTED_TOKENS:
        return reported
    estimate = rough_tokens(text)
    shown = json.dumps(reported)[:40]  # it came from JSON, so it goes back to JSON
    completion.notes.append(
        f"the vendor reported {shown} {what} tokens; estimated {estimate} instead"
    )
    return estimate


def json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    names = {str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), "other")


def vendor_error(exc: Exception, *, key: str, timeout: float) -> ProviderError:
    """Translate an SDK exception: 429, 408, 409, 5xx and network trouble are retryable."""
    if (refused := _refused(exc)) is not None:
        return ProviderError(str(refused), kind=Kind.BAD_RESPONSE)
    if isinstance(exc, openai.APITimeoutError | anthropic.APITimeoutError):
        return ProviderError(f"timed out after {timeout:.1f}s", kind=Kind.TIMEOUT, retryable=True)
    if isinstance(exc, openai.APIConnectionError | anthropic.APIConnectionError):
        reason = str(exc.__cause__ or exc) or type(exc).__name__
        return ProviderError(
            f"connection failed: {redact(reason, key)}"[:400],
            kind=Kind.CONNECTION,
            retryable=True,
        )
    if isinstance(exc, openai.APIStatusError | anthropic.APIStatusError):
        status = exc.status_code
        retry_after = _retry_after(exc.response.headers)
        if status == 429:
            wait = f" (retry after {retry_after:.1f}s)" if retry_after is not None else ""
            return ProviderError(
                f"HTTP 429 rate limited{wait}",
                kind=Kind.RATE_LIMITED,
                retryable=True,
                retry_after=retry_after,
                status=429,
            )
        retryable = status >= 500 or status in (408, 409)
        if retryable:
            kind = Kind.SERVER_ERROR
        elif status in (401, 403):
            kind = Kind.AUTH
        else:
            kind = Kind.CLIENT_ERROR
        return ProviderError(
            f"HTTP {status}: {redact(_vendor_message(exc), key)}",
            kind=kind,
            retryable=retryable,
            retry_after=retry_after if retryable else None,
            status=status,
        )
    return ProviderError(
        f"{type(exc).__name__}: {redact(str(exc), key)}"[:400], kind=Kind.BAD_RESPONSE
    )


def _refused(exc: BaseException | None) -> RefusedAnswer | None:
    """BoundedTransport's refusal, as it is or wrapped by the SDK."""
    for _ in range(10):
        if exc is None or isinstance(exc, RefusedAnswer):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _vendor_message(exc: openai.APIStatusError | anthropic.APIStatusError) -> str:
    """The vendor's own words from {"error": {"message": ...}} (OpenAI, Anthropic, vLLM; the
    OpenAI SDK unwraps "error" itself), {"error": "..."} (Ollama), or the raw body."""
    body = exc.body
    if isinstance(body, dict):
        body = body.get("error", body)
    if isinstance(body, dict):
        body = body.get("message") or body
    text = str(body or exc.response.reason_phrase or "no details").strip()
    if text[:1] == "<":  # a proxy's or web server's HTML error page: its markup says little
        kind = exc.response.headers.get("content-type", "").split(";")[0].strip() or "HTML"
        return f"{exc.response.reason_phrase or 'error'} ({kind}, {len(text):,} characters)"
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
