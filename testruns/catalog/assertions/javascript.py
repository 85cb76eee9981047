"""javascript assertions and transforms, as promptfoo writes them, run in the V8 sandbox.

The code is what promptfoo accepts: one line is an expression (`output.includes('Paris')`,
or declarations then one: `const n = output.length; n < 100`); several lines are a function
body that returns. It sees `output` (the model's answer, or what a transform made of it) and
`context` ({vars, prompt, test, config}). An assertion returns a boolean, a number (the score:
passing above 0, or at the assertion's threshold) or {pass, score, reason}; a transform
returns the new output (text, or data that later checks see as JSON).
"""

from __future__ import annotations

import json
import re
from typing import Any

from testruns.catalog.assertions.contract import Context, Result, binary, json_type, quote, show
from testruns.catalog.assertions.sandbox import SandboxError, run_function, syntax_problem

_DECLARATION = re.compile(r"^(const|let|var)\s")


def _last_statement_semicolon(code: str) -> int:
    """Where the last `;` outside quotes is (-1: none), as promptfoo finds it."""
    quote_char, last, escaped = "", -1, False
    for i, char in enumerate(code):
        if escaped:
            escaped = False
            continue
        if char == "\\":
            escaped = True
        elif quote_char:
            quote_char = "" if char == quote_char else quote_char
        elif char in "'\"`":
            quote_char = char
        elif char == ";":
            last = i
    return last


def assertion_body(code: str) -> str:
    """promptfoo's rule for an assertion: several lines are a function body; one line is an
    expression to return, after any declarations it starts with."""
    code = code.rstrip()
    if "\n" in code:
        return code
    trimmed = re.sub(r";+\s*$", "", code.strip())
    if _DECLARATION.match(trimmed):
        semicolon = _last_statement_semicolon(trimmed)
        if semicolon != -1 and (expression := trimmed[semicolon + 1 :].strip()):
            return f"{trimmed[: semicolon + 1]} return {expression}"
        return trimmed
    return f"return {trimmed}"


def transform_body(code: str) -> str:
    """promptfoo's rule for a transform: several lines are a body, one line an expression."""
    return code if "\n" in code else f"return {code}"


def code_problems(code: object, what: str, body: Any = assertion_body) -> list[str]:
    """The problems with a piece of code for validation: not text, blank, or not compiling."""
    if not isinstance(code, str):
        return [f"{what} must be JavaScript code (a string), got {json_type(code)}"]
    if not code.strip():
        return [f"{what} must not be blank"]
    if code.startswith("file://"):
        return [f"{what} is a file:// reference; paste the code itself"]
    try:
        problem = syntax_problem(body(code))
    except SandboxError as exc:
        return [f"{what} could not be checked: {exc}"]
    return [f"{what} does not compile: {problem}"] if problem else []


def javascript_problems(value: object) -> list[str]:
    return code_problems(value, "value")


def transform_problems(transform: object) -> list[str]:
    """An assertion's `transform`: code, or a list of code run in turn (the test's
    options.transform first, then the assertion's own)."""
    steps = transform if isinstance(transform, list) else [transform]
    if not steps:
        return ["transform must not be an empty list"]
    return [
        problem
        for i, step in enumerate(steps)
        for problem in code_problems(
            step, "transform" if len(steps) == 1 else f"transform[{i}]", transform_body
        )
    ]


def js_context(ctx: Context) -> dict[str, Any]:
    """promptfoo's `context` argument, as far as this app knows its parts."""
    return {
        "vars": dict(ctx.variables),
        "prompt": ctx.prompt,
        "test": {"vars": dict(ctx.variables)},
        "config": {},
    }


def apply_transforms(transform: str | list[str], ctx: Context) -> Any:
    """The output after each transform in turn; raises SandboxError."""
    value: Any = ctx.output
    context = js_context(ctx) | {"prompt": {"raw": ctx.prompt, "label": ""}}
    for code in transform if isinstance(transform, list) else [transform]:
        value = run_function(transform_body(code), value, context)
    if value is None:
        raise SandboxError("the transform returned nothing (null or undefined)")
    return value


def output_text(value: Any) -> str:
    """What text checks see of a transformed output: text as it is, data as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def check_javascript(value: str, ctx: Context) -> Result:
    try:
        result = run_function(assertion_body(value), ctx.output_value, js_context(ctx))
    except SandboxError as exc:
        return binary(False, f"javascript: {exc}")
    if isinstance(result, bool):
        return binary(result, f"the code returned {str(result).lower()}")
    if isinstance(result, int | float):
        passed = result > 0 if ctx.threshold is None else result >= ctx.threshold
        wanted = "above 0" if ctx.threshold is None else f"at least {ctx.threshold:g}"
        return Result(passed, float(result), f"the code returned the score {result:g}; {wanted}")
    if (
        isinstance(result, dict)
        and isinstance(result.get("pass"), bool)
        and isinstance(result.get("score", 0), int | float)
        and not isinstance(result.get("score", 0), bool)
    ):
        reason = result.get("reason")
        reason = reason if isinstance(reason, str) and reason else f"pass: {result['pass']}"
        score = float(result.get("score", 1.0 if result["pass"] else 0.0))
        return Result(result["pass"], score, reason)
    return binary(
        False,
        "javascript: the code must return a boolean, a number or {pass, score, reason}; "
        f"it returned {json_type(result)} {show(result, 60)} for output {quote(ctx.output, 40)}",
    )
