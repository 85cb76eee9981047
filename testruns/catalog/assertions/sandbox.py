"""Running a card's JavaScript (javascript assertions, transforms) in V8, away from the worker.

Each call runs in a fresh V8 isolate (mini-racer) with a time and a memory limit, inside a
helper process of its own (sandbox_child.py) that holds no settings, no keys and nothing but
V8: no require, no files, no network, no process. Why a process and not an isolate in the
worker: V8 aborts its whole process on some out-of-memory paths (a `new Array(2**30).fill(0)`
does), and the worker must survive whatever a card's code does. A helper that dies, or does
not answer within its time limit and a grace period, is killed and replaced; the call fails
with SandboxError saying why, and the next call gets a new helper.

Helpers are kept in a small pool per process, so a call costs a fresh isolate (~5 ms) and a
round trip through a pipe, not a process start.
"""

from __future__ import annotations

import functools
import json
import resource
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

TIME_LIMIT_MS = 1000
MEMORY_LIMIT_BYTES = 64 * 2**20
# All of a helper's data memory. V8 reserves about 600 MB of it before any code runs (its
# heap cage counts, as writable mappings); what is left caps typed arrays at about 200 MB.
PROCESS_MEMORY_BYTES = 768 * 2**20
# A helper gets this much longer than its code's own limit to answer (starting V8, encoding
# the answer), then it is killed.
GRACE_SECONDS = 2.0
IDLE_HELPERS = 4
CHILD = Path(__file__).with_name("sandbox_child.py")


class SandboxError(Exception):
    """The code did not give a value: its message says why (syntax, thrown error, time or
    memory limit, a crashed helper), in words fit for an assertion's reason."""

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind


def _limit_memory() -> None:
    """In the helper, before it starts: its whole data memory (V8's heap, array buffers, the
    interpreter) is capped, so what V8's own heap limit does not count (typed arrays live
    outside the heap) cannot take the host's memory either. V8 then refuses the allocation
    with a RangeError, or the helper dies, which the worker survives."""
    resource.setrlimit(resource.RLIMIT_DATA, (PROCESS_MEMORY_BYTES, PROCESS_MEMORY_BYTES))


class _Helper:
    def __init__(self) -> None:
        # -I: no user site, no PYTHON* variables; env={}: nothing of the server's environment.
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={},
            close_fds=True,
            preexec_fn=_limit_memory,
        )

    def ask(self, request: dict[str, Any], wait_seconds: float) -> dict[str, Any]:
        """One request and its answer; raises SandboxError (and kills the helper) when the
        helper dies or takes too long."""
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
        except OSError:
            raise self._died() from None
        deadline = time.monotonic() + wait_seconds
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready = select.select([self.process.stdout], [], [], max(0.0, left))[0]
            if not ready:
                self.kill()
                raise SandboxError("the code did not finish; it was stopped", "timeout")
            chunk = self.process.stdout.readline()
            if not chunk:
                raise self._died()
            line += chunk
        return json.loads(line)

    def _died(self) -> SandboxError:
        self.kill()
        stderr = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
        if "out of memory" in stderr.lower():
            return SandboxError(
                f"the code ran out of memory (V8 stopped it); limit {MEMORY_LIMIT_BYTES >> 20} MB",
                "memory",
            )
        last = stderr.strip().splitlines()[-1:] or ["no message"]
        return SandboxError(f"the JavaScript sandbox stopped unexpectedly ({last[0][:200]})")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


_idle: list[_Helper] = []
_lock = threading.Lock()


def _take() -> _Helper:
    with _lock:
        while _idle:
            helper = _idle.pop()
            if helper.alive:
                return helper
    return _Helper()


def _give_back(helper: _Helper) -> None:
    with _lock:
        if helper.alive and len(_idle) < IDLE_HELPERS:
            _idle.append(helper)
            return
    helper.kill()


def _call(request: dict[str, Any], wait_seconds: float) -> dict[str, Any]:
    helper = _take()
    try:
        answer = helper.ask(request, wait_seconds)
    except BaseException:
        helper.kill()
        raise
    _give_back(helper)
    return answer


def run_function(body: str, output: Any, context: dict[str, Any]) -> Any:
    """The value of `function(output, context) { <body> }`, as plain JSON data. Raises
    SandboxError for a syntax error, a thrown error, the time or memory limit, a value that
    is not JSON (a function, a cycle) and a Promise (only synchronous code runs here)."""
    request = {
        "op": "run",
        "source": body,
        "args": [output, context],
        "timeout_ms": TIME_LIMIT_MS,
        "max_memory": MEMORY_LIMIT_BYTES,
    }
    try:
        answer = _call(request, TIME_LIMIT_MS / 1000 + GRACE_SECONDS)
    except SandboxError as exc:  # a helper that was killed, or died
        answer = {"ok": False, "kind": exc.kind, "message": str(exc)}
    if answer.get("ok"):
        return answer.get("value")
    kind = answer.get("kind", "error")
    message = answer.get("message", "")
    if kind == "timeout":
        message = f"the code ran longer than the time limit of {TIME_LIMIT_MS} ms; it was stopped"
    elif kind == "memory":
        message = f"the code used more than the memory limit of {MEMORY_LIMIT_BYTES >> 20} MB"
    raise SandboxError(message, kind)


@functools.lru_cache(maxsize=1024)
def syntax_problem(body: str) -> str | None:
    """Why `body` does not compile as a function body, or None; the code is not run. Cached:
    an import checks the same defaultTest code once per test."""
    answer = _call({"op": "check", "source": body}, GRACE_SECONDS * 2)
    return None if answer.get("ok") else answer.get("message") or "does not compile"
