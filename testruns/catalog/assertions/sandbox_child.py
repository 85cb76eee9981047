"""The JavaScript sandbox's own process: one V8 isolate (mini-racer) per request, nothing else.

Run as a script by testruns.catalog.assertions.sandbox, never imported by the app: it reads one
JSON request per line on stdin and writes one JSON answer per line on stdout. It imports only
mini-racer and the standard library, and starts with an empty environment, so code that got
out of V8 would find no settings and no keys. A V8 that aborts the process (some out-of-memory
paths do) takes only this process down; the parent sees the pipe close and says so.

A request: {"op": "check", "source": <function body>} compiles without running;
{"op": "run", "source": <function body>, "args": [...], "timeout_ms": N, "max_memory": bytes}
calls `function(output, context) { <body> }` with the arguments and answers its value as JSON
(synchronously: a returned promise is refused). An answer: {"ok": true, "value": ...} or
{"ok": false, "kind": "syntax" | "error" | "timeout" | "memory" | "result", "message": ...}.
"""

from __future__ import annotations

import json
import re
import sys

from py_mini_racer import (
    JSEvalException,
    JSOOMException,
    JSParseException,
    JSTimeoutException,
    MiniRacer,
)

# Globals a promptfoo snippet might reach for to leave the sandbox. V8 alone has none of them
# (no require, process, fetch or fs); these stubs only turn "is not defined" into a message
# that says why. mini-racer's setTimeout stays: it cannot outlive the time limit.
PRELUDE = """
(() => {
  const refuse = (what) => () => {
    throw new Error(what + " is not available in this sandbox: assertions cannot reach " +
      "modules, files, the network or processes");
  };
  for (const name of ["require", "fetch", "XMLHttpRequest", "WebSocket", "importScripts"]) {
    Object.defineProperty(globalThis, name, { value: refuse(name), writable: false });
  }
  const proc = new Proxy({}, { get: (_, key) => key === "env" ? {} : refuse("process." +
    String(key))() });
  Object.defineProperty(globalThis, "process", { value: proc, writable: false });
  delete globalThis.WebAssembly;
})();
"""

# The value is handed back as JSON text, so that what crosses the pipe is plain data (a
# function or a cycle becomes a clear error instead of a V8 handle). Synchronous only: work
# queued as promise callbacks would run outside the time limit.
RUNNER = """
(() => {
  const body = %s;
  const args = %s;
  const fn = new Function("output", "context", body);
  const value = fn(args[0], args[1]);
  if (value !== null && typeof value === "object" && typeof value.then === "function") {
    throw new Error("the code returned a Promise; only synchronous code is supported here");
  }
  return JSON.stringify(value === undefined ? null : value);
})()
"""


def _answer(request: dict) -> dict:
    source = request["source"]
    with MiniRacer() as racer:
        racer.eval(PRELUDE)
        if request["op"] == "check":
            racer.eval(f"new Function('output', 'context', {json.dumps(source)}); 0")
            return {"ok": True, "value": None}
        code = RUNNER % (json.dumps(source), json.dumps(request["args"]))
        text = racer.eval(code, timeout=request["timeout_ms"], max_memory=request["max_memory"])
        return {"ok": True, "value": json.loads(text)}


def _failure(exc: BaseException) -> dict:
    message = str(exc).strip().splitlines()
    # V8's message starts with "<anonymous>:1: SyntaxError: ..."; that line number counts in
    # the wrapper, not in the user's code, so only the error itself is kept.
    text = next((line for line in message if "Error" in line), message[0] if message else "")
    text = re.sub(r"^(<anonymous>|undefined):\d+: ", "", text)
    if isinstance(exc, JSParseException):
        return {"ok": False, "kind": "syntax", "message": text}
    if isinstance(exc, JSTimeoutException):
        return {"ok": False, "kind": "timeout", "message": "time limit reached"}
    if isinstance(exc, JSOOMException):
        return {"ok": False, "kind": "memory", "message": "memory limit reached"}
    kind = "syntax" if "SyntaxError" in text else "error"
    return {"ok": False, "kind": kind, "message": text[:500]}


def main() -> None:
    for line in sys.stdin:
        try:
            answer = _answer(json.loads(line))
        except (JSEvalException, TimeoutError) as exc:
            answer = _failure(exc)
        except (TypeError, ValueError) as exc:  # a value JSON cannot carry
            answer = {"ok": False, "kind": "result", "message": str(exc)[:300]}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
