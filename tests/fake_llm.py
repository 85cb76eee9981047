r"""A fake LLM vendor over real HTTP on 127.0.0.1: OpenAI chat completions and Anthropic messages,
and OpenAI embeddings (a hashed bag of words: texts sharing words are close).

The only thing the test suite fakes is the vendor, so it answers over a real socket and the
real SDKs talk to it. Tests script it at run time:

    fake_llm.latency = 0.2
    fake_llm.script([FakeReply(status=429, headers={"Retry-After": "1"}), FakeReply(hang=True)])
    fake_llm.reply_with(lambda prompt: "yes" if "?" in prompt else "no")
    fake_llm.requests[-1].body, fake_llm.peak_concurrency, fake_llm.request_count

Answers a real vendor should never give, for robustness tests:

    FakeReply(raw="<html>...</html>", content_type="text/html")  # 200, not JSON at all
    FakeReply(text="a\x00b"), FakeReply(text="\ud800")   # JSON escapes \u0000 and \ud800
    FakeReply(usage={"prompt_tokens": -5, "completion_tokens": 10**12})
    FakeReply(size=50 * 2**20)  # a valid completion of 50 MB, streamed in chunks
    FakeReply(size=50 * 2**20, chunked=True)  # the same without a Content-Length
    FakeReply(size=50 * 2**20, gzip=True)  # the same gzip-compressed to about 50 KB
    FakeReply(trickle=0.5)  # a byte every half second: never a read timeout, never done

Standalone, for benchmarks and worker processes (prints its base URL, then serves), with
`POST /_control {"latency": 0.5, "script": [{"status": 500}], "reset": true}` and
`GET /_stats` ({"request_count", "in_flight", "peak_concurrency"}). A script entry takes
FakeReply's fields as JSON, so every answer above can be scripted from another process, e.g.
`{"raw": "<html></html>", "content_type": "text/html"}`, `{"text": "\u0000"}`,
`{"text": "\ud800"}`, `{"usage": {"prompt_tokens": -1}}` or `{"size": 52428800}`:

    python -m tests.fake_llm --port 0 --latency 0.1
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

CHUNK_BYTES = 64 * 1024  # a big body goes out in pieces this size, never whole in memory


@dataclass
class FakeReply:
    """One scripted answer. `text=None` means the default answer; `body` replaces the JSON."""

    text: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    hang: bool = False  # keep the connection open and never answer
    latency: float | None = None  # instead of the server's latency, for this reply only
    raw: str | None = None  # sent as it is instead of JSON, e.g. an HTML error page
    content_type: str | None = None  # default: application/json (text/html for `raw`)
    usage: dict[str, Any] | None = None  # replaces the usage block of the answer
    size: int | None = None  # a well-formed answer padded to this many bytes, streamed
    chunked: bool = False  # send the body without a Content-Length, in HTTP chunks
    gzip: bool = False  # compressed (and chunked), although the client asked for identity
    trickle: float | None = None  # send the body one byte every this many seconds


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any
    received_at: float = field(default_factory=time.time)  # wall clock, for benchmarks


Rule = Callable[[str], "str | FakeReply"]


class FakeLLMServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0):
        self.latency = latency
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._script: deque[FakeReply] = deque()
        self._rule: Rule | None = None
        self._requests: list[RecordedRequest] = []
        self._in_flight = self._peak = 0
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True  # a hanging handler must not block shutdown
        # A short poll interval makes stop() quick.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeLLMServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hanging and sleeping handlers first
        self._httpd.shutdown()
        self._httpd.server_close()

    def script(self, replies: list[FakeReply]) -> None:
        with self._lock:
            self._script.extend(replies)

    def reply_with(self, rule: Rule | None) -> None:
        with self._lock:
            self._rule = rule

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self._rule = None
            self._requests.clear()
            # Requests still in flight (a hang) stay counted, so the peak restarts from them.
            self._peak = self._in_flight

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def peak_concurrency(self) -> int:
        with self._lock:
            return self._peak

    def stats(self) -> dict[str, int]:
        with self._lock:
            counts = (len(self._requests), self._in_flight, self._peak)
        return dict(zip(("request_count", "in_flight", "peak_concurrency"), counts, strict=True))

    def _begin(self, request: RecordedRequest) -> FakeReply:
        """Record the request and pick its reply: the script first, then the rule, then echo."""
        with self._lock:
            self._requests.append(request)
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
            if self._script:
                return self._script.popleft()
            rule = self._rule
        if rule is None:
            return FakeReply()
        answer = rule(_last_user_text(request.body))
        return answer if isinstance(answer, FakeReply) else FakeReply(text=answer)

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1


def _make_handler(server: FakeLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs' connection pools expect
        # Headers and body go out in two writes; with Nagle's algorithm the second waits for
        # the client's delayed ACK, and every answer on a kept-alive connection took 40 ms.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                models = [{"id": "fake-model", "object": "model", "owned_by": "fake"}]
                self._json(200, {"object": "list", "data": models})
            elif self.path == "/_stats":
                self._json(200, server.stats())
            else:
                self._json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null")
            if self.path == "/_control":
                self._control(body or {})
                return
            if self.path == "/v1/embeddings":
                headers = {name.lower(): value for name, value in self.headers.items()}
                with server._lock:
                    server._requests.append(RecordedRequest(self.path, headers, body))
                self._json(200, _embeddings_reply(body))
                return
            if self.path not in ("/v1/chat/completions", "/v1/messages"):
                self._json(404, {"error": {"message": f"no route {self.path}"}})
                return
            headers = {name.lower(): value for name, value in self.headers.items()}
            reply = server._begin(RecordedRequest(self.path, headers, body))
            try:
                answer = self._prepare(reply, body)
            finally:
                # Out of flight before the answer goes out, so a client holding its answer
                # never sees itself still counted.
                server._end()
            if answer is None:
                self.close_connection = True  # the client sees the connection drop
            elif reply.raw is not None or reply.size is not None or reply.gzip or reply.trickle:
                self._send_body(reply, answer[1])
            else:
                self._json(*answer)

        def _prepare(self, reply: FakeReply, body: Any) -> tuple[int, Any, dict] | None:
            """Wait out the latency, then build (status, payload, headers); None: no answer."""
            delay = server.latency if reply.latency is None else reply.latency
            if delay and not self._client_waits(delay):
                return None
            if reply.hang:
                self._client_waits(None)
                return None
            if reply.raw is not None:
                return reply.status, reply.raw, reply.headers
            if reply.body is not None or reply.status >= 400:
                message = reply.text or f"fake error {reply.status}"
                error = {"error": {"message": message, "type": "fake_error"}}
                return reply.status, reply.body or error, reply.headers
            text = reply.text if reply.text is not None else "echo: " + _last_user_text(body)
            shape = _anthropic_reply if self.path == "/v1/messages" else _openai_reply
            payload = shape(body, text)
            if reply.usage is not None:
                payload["usage"] = reply.usage
            return reply.status, payload, reply.headers

        def _send_body(self, reply: FakeReply, payload: Any) -> None:
            """The answer in pieces: `raw` as it is, or `payload` as JSON (its text padded to
            `size` bytes); gzip-compressed on the fly, and one byte per `trickle` seconds."""
            if reply.raw is not None:
                data = reply.raw.encode("utf-8", "surrogatepass")
                pieces, length = iter([data]), len(data)
                content_type = reply.content_type or "text/html; charset=utf-8"
            else:
                if reply.size is not None:
                    pieces, length = _padded(payload, reply.size)
                else:
                    data = json.dumps(payload).encode()
                    pieces, length = iter([data]), len(data)
                content_type = reply.content_type or "application/json"
            if reply.gzip:
                pieces, length = _gzipped(pieces), None
            if reply.trickle:
                pieces = (piece[i : i + 1] for piece in pieces for i in range(len(piece)))
            chunked = reply.chunked or length is None
            self.send_response(reply.status)
            self.send_header("Content-Type", content_type)
            if reply.gzip:
                self.send_header("Content-Encoding", "gzip")
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(length))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            try:
                for piece in pieces:
                    if reply.trickle and server._stopping.wait(reply.trickle):
                        break
                    if chunked:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    else:
                        self.wfile.write(piece)
                    if reply.trickle:
                        self.wfile.flush()
                else:
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                    return
                self.close_connection = True  # stopped mid-answer
            except OSError:  # the client stopped reading (it refused the answer): expected
                self.close_connection = True

        def _client_waits(self, seconds: float | None) -> bool:
            """Wait `seconds` (None: for ever) while the client keeps its connection open, as a
            real server would: True when the time is up, False as soon as the client hangs up
            or the server stops. The hang-up is seen at once (a blocking select), so a request
            the client gave up on stops counting as in flight before its retry can arrive."""
            deadline = None if seconds is None else time.monotonic() + seconds
            while not server._stopping.is_set():
                left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if left <= 0:
                    return True
                try:
                    readable, _, _ = select.select([self.connection], [], [], left)
                    if readable:
                        if not self.connection.recv(1, socket.MSG_PEEK):
                            return False
                        time.sleep(left)  # bytes of a next request: not a hang-up
                except OSError:  # reset by the client: it gave up too
                    return False
            return False

        def _control(self, body: dict[str, Any]) -> None:
            if body.get("reset"):
                server.reset()
            if "latency" in body:
                server.latency = float(body["latency"])
            server.script([FakeReply(**reply) for reply in body.get("script", [])])
            self._json(200, server.stats())

        def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()  # ASCII: "\ud800" goes out as its escape
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _padded(payload: Any, size: int) -> tuple[Iterator[bytes], int]:
    """The answer as JSON with its text grown to make `size` bytes in all (at least the answer
    itself), as pieces of CHUNK_BYTES: a 50 MB answer never sits in memory whole."""
    marker = "PAD-GOES-HERE-7f3a"
    if isinstance(payload, dict) and payload.get("choices"):  # OpenAI
        payload["choices"][0]["message"]["content"] = marker
    elif isinstance(payload, dict) and payload.get("content"):  # Anthropic
        payload["content"][0]["text"] = marker
    else:  # an error or a scripted body: padded beside it
        payload = {"padding": marker, "body": payload}
    head, tail = json.dumps(payload).encode().split(marker.encode(), 1)
    padding = max(0, size - len(head) - len(tail))
    chunk = b"x" * CHUNK_BYTES

    def pieces() -> Iterator[bytes]:
        yield head
        for start in range(0, padding, CHUNK_BYTES):
            yield chunk[: min(CHUNK_BYTES, padding - start)]
        yield tail

    return pieces(), len(head) + padding + len(tail)


def _gzipped(pieces: Iterator[bytes]) -> Iterator[bytes]:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    for piece in pieces:
        if out := compressor.compress(piece):
            yield out
    yield compressor.flush()


def _text_of(content: Any) -> str:
    """Message content is a string or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _last_user_text(body: Any) -> str:
    messages = body.get("messages", []) if isinstance(body, dict) else []
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return _text_of(users[-1].get("content")) if users else ""


def _words_in(body: dict[str, Any]) -> int:
    """Token counts are word counts: deterministic, and easy to predict in a test."""
    texts = [body.get("system")] + [m.get("content") for m in body.get("messages", [])]
    return sum(len(_text_of(text).split()) for text in texts)


def _openai_reply(body: dict[str, Any], text: str) -> dict[str, Any]:
    usage = {"prompt_tokens": _words_in(body), "completion_tokens": len(text.split())}
    message = {"role": "assistant", "content": text}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake-model"),
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {**usage, "total_tokens": sum(usage.values())},
    }


EMBEDDING_DIMENSIONS = 64


def bag_of_words_vector(text: str) -> list[float]:
    """A deterministic embedding: a count per hashed lower-cased word, normalised, so texts
    sharing words are close and texts sharing none are orthogonal."""
    vector = [0.0] * EMBEDDING_DIMENSIONS
    for word in "".join(c if c.isalnum() else " " for c in text.lower()).split():
        vector[zlib.crc32(word.encode()) % EMBEDDING_DIMENSIONS] += 1.0
    norm = sum(x * x for x in vector) ** 0.5 or 1.0
    return [x / norm for x in vector]


def _embeddings_reply(body: Any) -> dict[str, Any]:
    texts = body.get("input", []) if isinstance(body, dict) else []
    texts = [texts] if isinstance(texts, str) else texts
    data = [
        {"object": "embedding", "index": i, "embedding": bag_of_words_vector(str(text))}
        for i, text in enumerate(texts)
    ]
    tokens = sum(len(str(text).split()) for text in texts)
    return {
        "object": "list",
        "data": data,
        "model": body.get("model", "fake-embedding") if isinstance(body, dict) else "",
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _anthropic_reply(body: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "id": f"msg_{uuid.uuid4().hex[:12]}",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": text}],
        "model": body.get("model", "fake-model"),
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": _words_in(body), "output_tokens": len(text.split())},
    }


@pytest.fixture(name="fake_llm")
def fake_llm_fixture() -> Iterator[FakeLLMServer]:
    """A fresh fake vendor on a free port; `.base_url` is http://127.0.0.1:PORT/v1.

    Either list this module in `pytest_plugins`, or import `fake_llm_fixture` into a test
    module: importing it as `fake_llm` also works, but then ruff's F811 flags every test
    whose argument shadows the import."""
    server = FakeLLMServer().start()
    yield server
    server.stop()


fake_llm = fake_llm_fixture  # the same fixture, for `from tests.fake_llm import fake_llm`


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a fake OpenAI/Anthropic-compatible LLM.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    args = parser.parse_args()
    server = FakeLLMServer(args.host, args.port, args.latency).start()
    # SIGTERM from a benchmark's cleanup ends as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(server.base_url, flush=True)  # the parent reads this line to find the port
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
