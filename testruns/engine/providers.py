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
"""

from __future__ import annotations

import email.utils
import functools
import hashlib
import json
import os
import random
import shlex
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anthropic
import httpx2
import openai
from django.conf import settings
from django.core.exceptions import ValidationError

from testruns.catalog import provider_rules
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
# A usage number above this is not a count of anything a call did (a billion tokens); it is
# replaced by an estimate, like a negative or fractional one.
MAX_TRUSTED_TOKENS = 10**9


class Kind:
    """What went wrong, for retry decisions, metrics and people reading the error."""

    BAD_RESPONSE = "bad_response"  # an answer that is not a completion (HTML, junk, too big)
    RATE_LIMITED = "rate_limited"  # HTTP 429
    SERVER_ERROR = "server_error"  # 5xx, 408/409, or an error object in a 200
    TIMEOUT = "timeout"
    CONNECTION = "connection"  # refused, reset, DNS, TLS
    CLIENT_ERROR = "client_error"  # another 4xx: the request itself was refused
    AUTH = "auth"  # 401/403
    CONFIG = "config"  # the provider's setup: no key, unknown kind, no command
    COMMAND_FAILED = "command_failed"  # a local program exited with an error


class ProviderError(Exception):
    """A call failed. `kind` says what went wrong (see Kind); `retryable` whether trying again
    may help (429, 5xx, network); `status` is the HTTP status when there was one (a 429 also
    slows the provider down)."""

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        retryable: bool = False,
        retry_after: float | None = None,
        status: int | None = None,
    ):
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


@dataclass
class Completion:
    text: str
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: float = 0.0
    # What was not taken as the vendor sent it (untrusted usage numbers), for the result.
    notes: list[str] = field(default_factory=list)


def cost_of(provider: Provider, tokens_in: int, tokens_out: int) -> Decimal:
    """Never negative: a negative price is a typo in the admin, not a refund."""
    million = Decimal(1_000_000)
    cost = (
        provider.price_input_per_mtok * tokens_in + provider.price_output_per_mtok * tokens_out
    ) / million
    return max(cost, Decimal(0))


def max_response_bytes() -> int:
    """Read at each call, so a changed setting needs no new client."""
    return max(1024, int(settings.VENDOR_MAX_RESPONSE_BYTES))


def _size(limit: int) -> str:
    if limit % (1024 * 1024) == 0:
        return f"{limit // (1024 * 1024)} MiB"
    if limit % 1024 == 0:
        return f"{limit // 1024} KiB"
    return f"{limit:,} bytes"


class RefusedAnswer(Exception):
    """Raised by BoundedTransport for an answer it will not read to the end; the SDKs let it
    through as it is or as the cause of their connection error."""


class ResponseTooLarge(RefusedAnswer):
    def __init__(self, limit: int):
        # Not retryable: the same request would most likely fetch the same flood again.
        super().__init__(
            f"the answer was larger than {_size(limit)} (the limit VENDOR_MAX_RESPONSE_BYTES sets)"
        )
        self.limit = limit


STREAM_GRACE_SECONDS = 5.0


class _BoundedStream(httpx2.SyncByteStream):
    """The body as it arrives, refused past `limit` bytes (after decompression, when the
    server compressed it although asked not to: a small gzip bomb must not grow to gigabytes
    in memory) or past the deadline."""

    def __init__(
        self, inner: httpx2.SyncByteStream, limit: int, deadline: float | None, encoding: str
    ):
        self._inner, self._limit, self._deadline = inner, limit, deadline
        self._decoder = _decompressor(encoding) if encoding else None

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for chunk in self._inner:
            for piece in self._decode(chunk, self._limit - seen):
                seen += len(piece)
                if seen > self._limit:
                    raise ResponseTooLarge(self._limit)
                yield piece
            # A server that trickles a byte now and then never trips the read timeout (it is
            # per read); the whole answer gets the request's timeout and a grace period.
            if self._deadline is not None and time.monotonic() > self._deadline:
                raise httpx2.ReadTimeout("the answer kept arriving past the timeout")

    def _decode(self, chunk: bytes, room: int) -> Iterator[bytes]:
        if self._decoder is None:
            yield chunk
            return
        try:
            # At most room + 1 bytes at a time: enough to tell that the limit is passed.
            piece = self._decoder.decompress(chunk, max(1, room + 1))
            while piece:
                yield piece
                room -= len(piece)
                tail = self._decoder.unconsumed_tail
                piece = self._decoder.decompress(tail, max(1, room + 1)) if tail else b""
        except zlib.error as exc:
            raise RefusedAnswer(f"the answer could not be decompressed: {exc}") from None

    def close(self) -> None:
        self._inner.close()


def _decompressor(encoding: str) -> Any:
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    raise RefusedAnswer(
        f"the answer was compressed with {encoding[:40]!r}, which was not asked for"
    )


class BoundedTransport(httpx2.BaseTransport):
    """httpx2.HTTPTransport that refuses an answer bigger than max_response_bytes(): at once
    when Content-Length says so, else once that many bytes have arrived. Only the part read
    so far is ever in memory."""

    def __init__(self, inner: httpx2.HTTPTransport):
        self._inner = inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        started = time.monotonic()
        # Uncompressed, so that the bytes counted are the bytes kept.
        request.headers["Accept-Encoding"] = "identity"
        response = self._inner.handle_request(request)
        try:
            limit = max_response_bytes()
            declared = response.headers.get("content-length", "")
            encodings = [
                value.strip().lower()
                for value in response.headers.get_list("content-encoding", split_commas=True)
                if value.strip().lower() not in ("", "identity")
            ]
            if len(encodings) > 1:
                raise RefusedAnswer("the answer was compressed more than once")
            encoding = encodings[0] if encodings else ""
            if not encoding and declared.isdigit() and int(declared) > limit:
                raise ResponseTooLarge(limit)
            timeouts = request.extensions.get("timeout") or {}
            longest = max((value for value in timeouts.values() if value), default=None)
            deadline = started + longest + STREAM_GRACE_SECONDS if longest else None
            stream = _BoundedStream(response.stream, limit, deadline, encoding)  # type: ignore[arg-type]
        except BaseException:
            response.close()
            raise
        if encoding:  # decoded here, with a bound; httpx2 must not decode it again
            del response.headers["content-encoding"]
            response.headers.pop("content-length", None)
        response.stream = stream
        return response

    def close(self) -> None:
        self._inner.close()


# The SDKs' own defaults for their connection pools.
CONNECTION_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)


def _http_client(base_url: str) -> httpx2.Client:
    """An HTTP client for the SDKs that reads at most max_response_bytes() of an answer. With a
    transport of its own, httpx2 no longer looks for proxies in the environment, so the proxy
    for this base URL is looked up here (HTTPS_PROXY, NO_PROXY, ...)."""
    transport = httpx2.HTTPTransport(limits=CONNECTION_LIMITS, proxy=_env_proxy(base_url))
    return httpx2.Client(transport=BoundedTransport(transport), follow_redirects=True)


def _env_proxy(base_url: str) -> str | None:
    parts = urllib.parse.urlsplit(base_url)
    if not parts.hostname or urllib.request.proxy_bypass_environment(parts.hostname):
        return None
    proxies = urllib.request.getproxies_environment()
    return proxies.get(parts.scheme or "https") or proxies.get("all")


def complete(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
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


def _call_openai(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
    key = _api_key(provider)
    params = provider.parameters or {}
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    try:
        # The raw response: the body is parsed and checked here, so that an answer of the
        # wrong shape is a clear ProviderError instead of whatever the SDK's parser raises.
        raw = _openai_client(provider.base_url, key).chat.completions.with_raw_response.create(
            model=provider.model,
            messages=messages,  # type: ignore[arg-type]
            timeout=timeout,
            extra_body=_allowed(params, OPENAI_EXTRA_PARAMETERS) or None,
            **_allowed(params, OPENAI_PARAMETERS),
        )
    except (openai.OpenAIError, RefusedAnswer) as exc:
        raise _vendor_error(exc, key=key, timeout=timeout) from None
    except UnicodeEncodeError:
        raise _unsendable() from None
    data = _json_answer(raw.http_response, "a chat completion", key)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ProviderError(f"the answer has no choices; {NOT_THE_API}", kind=Kind.BAD_RESPONSE)
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise ProviderError(
            f"the answer's first choice has no message; {NOT_THE_API}", kind=Kind.BAD_RESPONSE
        )
    text = message.get("content")
    if text is None:  # a refusal or tool call: no text to check
        text = ""
    if not isinstance(text, str):
        raise ProviderError(
            f"the answer's content is {_json_type(text)}, not text; {NOT_THE_API}",
            kind=Kind.BAD_RESPONSE,
        )
    completion = Completion(text)
    usage = _usage(data, completion)
    completion.tokens_in = _count(usage.get("prompt_tokens"), system + prompt, "input", completion)
    completion.tokens_out = _count(usage.get("completion_tokens"), text, "output", completion)
    return completion


def _call_anthropic(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
    key = _api_key(provider)
    params = provider.parameters or {}
    try:
        raw = _anthropic_client(provider.base_url, key).messages.with_raw_response.create(
            model=provider.model,
            max_tokens=int(params.get("max_tokens", ANTHROPIC_DEFAULT_MAX_TOKENS)),
            system=system or anthropic.omit,
            messages=[{"role": "user", "content": prompt}],
            # Given per request, it also skips the SDK's "use streaming" guess from max_tokens.
            timeout=timeout,
            extra_body=_allowed(params, ANTHROPIC_PARAMETERS) or None,
        )
    except (anthropic.AnthropicError, RefusedAnswer) as exc:
        raise _vendor_error(exc, key=key, timeout=timeout) from None
    except UnicodeEncodeError:
        raise _unsendable() from None
    data = _json_answer(raw.http_response, "a message", key)
    content = data.get("content")
    if not isinstance(content, list):
        raise ProviderError(f"the answer has no content; {NOT_THE_API}", kind=Kind.BAD_RESPONSE)
    texts = [
        block.get("text")
        for block in content
        if isinstance(block, dict) and block.get("type") == "text"
    ]
    if not all(isinstance(text, str) for text in texts):
        raise ProviderError(
            f"a text block of the answer holds no text; {NOT_THE_API}", kind=Kind.BAD_RESPONSE
        )
    text = "".join(texts)
    completion = Completion(text)
    usage = _usage(data, completion)
    completion.tokens_in = _count(usage.get("input_tokens"), system + prompt, "input", completion)
    completion.tokens_out = _count(usage.get("output_tokens"), text, "output", completion)
    return completion


def _unsendable() -> ProviderError:
    # Sending it with U+FFFD instead would test a prompt other than the one written.
    return ProviderError(
        "the prompt cannot be sent: it holds a lone surrogate (such as \\ud800), which is "
        "not text any vendor can read",
        kind=Kind.CLIENT_ERROR,
    )


def _json_answer(response: httpx2.Response, what: str, key: str) -> dict[str, Any]:
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
        text = _redact(str(message or "no details"), key)[:VENDOR_MESSAGE_CHARS]
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


def _usage(data: dict[str, Any], completion: Completion) -> dict[str, Any]:
    usage = data.get("usage")
    if usage is None:
        return {}
    if not isinstance(usage, dict):
        completion.notes.append(f"the vendor's usage is {_json_type(usage)}, not an object")
        return {}
    return usage


def _call_command(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
    """Run the provider's program without a shell: prompt on stdin, answer on stdout, the
    system prompt in $PROMPT_SYSTEM.

    A timeout is not retryable: the same program on the same machine with the same input
    would most likely run as long again, so a retry only doubles the wait. A program that
    knows better exits with 75 (EX_TEMPFAIL), which is retryable. Its stdout is read up to
    max_response_bytes() and the program is stopped beyond that.
    """
    try:
        args = shlex.split(provider.command)
    except ValueError as exc:
        raise ProviderError(f"the command cannot be parsed: {exc}", kind=Kind.CONFIG) from None
    if not args:
        raise ProviderError("no command is configured", kind=Kind.CONFIG)
    limit = max_response_bytes()
    try:
        done = _run_bounded(args, prompt, timeout, {**os.environ, "PROMPT_SYSTEM": system}, limit)
    except OSError as exc:  # not found, not executable
        raise ProviderError(
            f"command could not start: {args[0]}: {exc.strerror}", kind=Kind.CONFIG
        ) from None
    if done.timed_out:
        raise ProviderError(f"command timed out after {timeout:.1f}s", kind=Kind.TIMEOUT)
    if done.too_large:
        raise ProviderError(
            f"the command's answer was larger than {_size(limit)} "
            "(the limit VENDOR_MAX_RESPONSE_BYTES sets)",
            kind=Kind.BAD_RESPONSE,
        )
    if done.returncode:
        code = done.returncode
        how = f"status {code}" if code > 0 else f"signal {-code}"
        tail = done.stderr.strip()[-VENDOR_MESSAGE_CHARS:] or "(no output on stderr)"
        raise ProviderError(
            f"command exited with {how}: {tail}",
            kind=Kind.COMMAND_FAILED,
            retryable=code == EX_TEMPFAIL,
        )
    text = done.stdout.strip()
    return Completion(text, _rough_tokens(system + prompt), _rough_tokens(text))


@dataclass
class _Finished:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    too_large: bool = False


STDERR_KEPT_BYTES = 64 * 1024  # only the tail of stderr is shown; the rest is not kept


def _run_bounded(
    args: list[str], stdin: str, timeout: float, env: dict[str, str], limit: int
) -> _Finished:
    """subprocess.run(capture_output=True), minus its appetite: stdout is read up to `limit`
    bytes (the program is killed past it) and only the last STDERR_KEPT_BYTES of stderr are
    kept. One thread per pipe, so that a program writing a lot to one never blocks on it."""
    process = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        shell=False,
    )
    out, err = bytearray(), bytearray()
    too_large = threading.Event()

    def feed() -> None:
        try:
            process.stdin.write(stdin.encode("utf-8", "replace"))
        except OSError:  # the program exited without reading it all: its business
            pass
        finally:
            try:
                process.stdin.close()
            except OSError:
                pass

    def read_out() -> None:
        while chunk := process.stdout.read1(65536):
            if len(out) + len(chunk) > limit:
                too_large.set()
                process.kill()
                return
            out.extend(chunk)

    def read_err() -> None:
        while chunk := process.stderr.read1(65536):
            err.extend(chunk)
            del err[:-STDERR_KEPT_BYTES]

    threads = [threading.Thread(target=fn, daemon=True) for fn in (feed, read_out, read_err)]
    for thread in threads:
        thread.start()
    timed_out = False
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        process.kill()
        process.wait()
    for thread in threads:
        # A grandchild holding the pipes open must not hold this thread: the pipes are left
        # to it, and closed when it ends.
        thread.join(timeout=1)
    for pipe in (process.stdout, process.stderr):
        try:
            pipe.close()
        except OSError:
            pass
    return _Finished(
        process.returncode,
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
        timed_out=timed_out,
        too_large=too_large.is_set(),
    )


def _api_key(provider: Provider) -> str:
    """Read at call time, so a rotated key needs no restart. The provider rules are checked
    again here, the last line of defence for a row saved before they existed (or written
    behind the models' validation): no server secret is sent, and nothing goes to a cloud
    metadata address."""
    try:
        provider_rules.check_base_url(provider.base_url, resolve=False)
        if provider.api_key_env:
            provider_rules.check_key_env_name(provider.api_key_env)
    except ValidationError as exc:
        raise ProviderError(exc.messages[0], kind=Kind.CONFIG) from None
    if not provider.api_key_env:
        return NO_KEY
    key = os.environ.get(provider.api_key_env)
    if not key:
        raise ProviderError(
            f"the environment variable {provider.api_key_env} that should hold the API key "
            "is not set",
            kind=Kind.CONFIG,
        )
    return key


# A client costs ~25 ms of CPU to build (its TLS context), so one is kept per (URL, key) and
# reuses its connections; the timeout is given per request. A rotated key gets a new client.
@functools.lru_cache(maxsize=32)
def _openai_client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base_url or None,
        api_key=key,
        max_retries=0,
        http_client=_http_client(base_url or "https://api.openai.com/v1"),
    )


@functools.lru_cache(maxsize=32)
def _anthropic_client(base_url: str, key: str) -> anthropic.Anthropic:
    # The SDK adds /v1 itself; OpenAI-style URLs include it, so a pasted one works too.
    base_url = base_url.rstrip("/").removesuffix("/v1")
    return anthropic.Anthropic(
        base_url=base_url or None,
        api_key=key,
        max_retries=0,
        http_client=_http_client(base_url or "https://api.anthropic.com"),
    )


def _allowed(params: Mapping[str, Any], names: frozenset[str]) -> dict[str, Any]:
    return {name: value for name, value in params.items() if name in names}


def _vendor_error(exc: Exception, *, key: str, timeout: float) -> ProviderError:
    """Translate an SDK exception: 429, 408, 409, 5xx and network trouble are retryable."""
    if (refused := _refused(exc)) is not None:
        return ProviderError(str(refused), kind=Kind.BAD_RESPONSE)
    if isinstance(exc, openai.APITimeoutError | anthropic.APITimeoutError):
        return ProviderError(f"timed out after {timeout:.1f}s", kind=Kind.TIMEOUT, retryable=True)
    if isinstance(exc, openai.APIConnectionError | anthropic.APIConnectionError):
        reason = str(exc.__cause__ or exc) or type(exc).__name__
        return ProviderError(
            f"connection failed: {_redact(reason, key)}"[:400],
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
            f"HTTP {status}: {_redact(_vendor_message(exc), key)}",
            kind=kind,
            retryable=retryable,
            retry_after=retry_after if retryable else None,
            status=status,
        )
    return ProviderError(
        f"{type(exc).__name__}: {_redact(str(exc), key)}"[:400], kind=Kind.BAD_RESPONSE
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
        text=text, tokens_in=_rough_tokens(system + prompt), tokens_out=_rough_tokens(text)
    )


def _count(reported: Any, text: str, what: str, completion: Completion) -> int:
    """The vendor's token count, or an estimate when it reports none (some local servers) or
    one no call can have used (negative, fractional, a string, over MAX_TRUSTED_TOKENS): such a
    number would corrupt the totals, make a negative cost or overflow the column."""
    if reported is None:
        return _rough_tokens(text)
    if type(reported) is int and 0 <= reported <= MAX_TRUSTED_TOKENS:
        return reported
    estimate = _rough_tokens(text)
    shown = json.dumps(reported)[:40]  # it came from JSON, so it goes back to JSON
    completion.notes.append(
        f"the vendor reported {shown} {what} tokens; estimated {estimate} instead"
    )
    return estimate


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    names = {str: "a string", list: "an array", dict: "an object"}
    return names.get(type(value), "other")


def _rough_tokens(text: str) -> int:
    return max(1, len(text) // 4)


_CALLS: dict[str, Callable[..., Completion]] = {
    Provider.Kind.OPENAI: _call_openai,
    Provider.Kind.ANTHROPIC: _call_anthropic,
    Provider.Kind.COMMAND: _call_command,
    Provider.Kind.SIMULATOR: _simulate,
}
