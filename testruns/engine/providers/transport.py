"""Reading a vendor's answer without trusting it: every HTTP request goes through
BoundedTransport, which refuses a body past VENDOR_MAX_RESPONSE_BYTES (counted after
decompression, so a small gzip bomb cannot grow in memory) or one that keeps trickling past the
request's timeout; and the proxy for a base URL is taken from the environment as httpx2 would."""

from __future__ import annotations

import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from typing import Any

import httpx2
from django.conf import settings


def max_response_bytes() -> int:
    """Read at each call, so a changed setting needs no new client."""
    return max(1024, int(settings.VENDOR_MAX_RESPONSE_BYTES))


def size_label(limit: int) -> str:
    """A byte limit as people write it: "4 MiB", "64 KiB" or "1,000 bytes"."""
    if limit % (1024 * 1024) == 0:
        return f"{limit // (1024 * 1024)} MiB"
    if limit % 1024 == 0:
        return f"{limit // 1024} KiB"
    return f"{limit:,} bytes"


class RefusedAnswer(Exception):
    """Raised by BoundedTransport for an answer it will not read to the end; the SDKs let it
    through as it is or as the cause of their connection error."""


class ResponseTooLarge(RefusedAnswer):
    def __init__(self, limit: int) -> None:
        # Not retryable: the same request would most likely fetch the same flood again.
        super().__init__(
            f"the answer was larger than {size_label(limit)} "
            "(the limit VENDOR_MAX_RESPONSE_BYTES sets)"
        )
        self.limit = limit


STREAM_GRACE_SECONDS = 5.0


class _BoundedStream(httpx2.SyncByteStream):
    """The body as it arrives, refused past `limit` bytes (after decompression, when the
    server compressed it although asked not to: a small gzip bomb must not grow to gigabytes
    in memory) or past the deadline."""

    def __init__(
        self, inner: httpx2.SyncByteStream, limit: int, deadline: float | None, encoding: str
    ) -> None:
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

    def __init__(self, inner: httpx2.HTTPTransport) -> None:
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


def http_client(base_url: str) -> httpx2.Client:
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
