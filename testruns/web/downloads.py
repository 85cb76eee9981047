"""Exports as streamed downloads: the body goes out in chunks of about CHUNK_CHARS as the
results are read (`.iterator()`), so a 10,000-case export never sits in memory whole.

Under ASGI (daphne), Django reads a synchronous iterator to its end before it sends a byte
(StreamingHttpResponse.__aiter__ warns and does so), which is buffering under another name.
There the chunks are pulled by an asynchronous iterator instead, each in the request's own
thread, where its database connection (and the results' server-side cursor) lives.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import StreamingHttpResponse

# Few enough sends for a large export, small enough to start at once.
CHUNK_CHARS = 64 * 1024


def batched(chunks: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """The chunks joined into pieces of at least `size` characters (the last one shorter).
    Closing it closes `chunks`, so a download cut short frees its cursor at once."""
    buffer: list[str] = []
    length = 0
    try:
        for chunk in chunks:
            buffer.append(chunk)
            length += len(chunk)
            if length >= size:
                yield "".join(buffer)
                buffer, length = [], 0
        if buffer:
            yield "".join(buffer)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


class PulledInThread:
    """An asynchronous iterator over a synchronous one, each step in the request's thread.
    `close` is synchronous: Django calls it (in that thread) when the response is closed."""

    def __init__(self, chunks: Iterator[str]):
        self.chunks = chunks
        self._step = sync_to_async(next, thread_sensitive=True)

    def __aiter__(self) -> PulledInThread:
        return self

    async def __anext__(self) -> str:
        chunk = await self._step(self.chunks, None)
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


def download(
    request, chunks: Iterable[str], *, content_type: str, filename: str
) -> StreamingHttpResponse:
    """A streamed attachment named `filename` whose body is `chunks`, concatenated."""
    body = batched(chunks)
    content = PulledInThread(body) if isinstance(request, ASGIRequest) else body
    response = StreamingHttpResponse(content, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
