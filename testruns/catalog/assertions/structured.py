"""JSON assertions: is-json (with an optional schema), json-schema and json-path, and the strict
JSON reading and JSON equality that `equals` also uses for an object or array value."""

from __future__ import annotations

import json
import re
from typing import Any

from jsonschema import Draft202012Validator, SchemaError
from jsonschema.exceptions import best_match
from referencing.exceptions import Unresolvable

from testruns.catalog.assertions.contract import (
    MISSING,
    Context,
    Result,
    binary,
    json_type,
    object_problems,
    quote,
    show,
)


class NotJson(Exception):
    """The output should have been JSON; check_assertion turns this into a failure."""


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def load_json(output: str) -> Any:
    """Strict JSON, as JSON.parse reads it: Python's NaN/Infinity extensions are refused."""
    try:
        return json.loads(output, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise NotJson(f"output is not valid JSON ({exc}); output: {quote(output)}") from exc


def same_json(a: object, b: object) -> bool:
    """JSON equality: 1 equals 1.0, but true is not 1 (Python's == says it is)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same_json, a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


_PATH_STEP = re.compile(r"""\.([^.\[\]*'"]+)|\[(-?\d+)\]|\['([^']*)'\]|\["([^"]*)"\]""")


def parse_path(path: str) -> list[str | int]:
    """Steps of `$.a.b[0]`, `$['a b'][-1]` or `a.b.0`: keys and indices only, no wildcards or
    recursive descent. Raises ValueError for anything else."""
    text = path.strip()
    if not text:
        raise ValueError("path is empty")
    text = text[1:] if text.startswith("$") else text if text.startswith("[") else "." + text
    steps: list[str | int] = []
    pos = 0
    while pos < len(text):
        match = _PATH_STEP.match(text, pos)
        if match is None:
            raise ValueError(f"unsupported syntax at {quote(text[pos:], 20)}")
        dotted, index, single, double = match.groups()
        key = next((s for s in (dotted, single, double) if s is not None), "")
        steps.append(int(index) if index is not None else key)
        pos = match.end()
    return steps


def _as_index(step: str | int) -> int | None:
    """`a.0` is the dotted spelling of `a[0]`, so a key made of digits also indexes an array."""
    if isinstance(step, int):
        return step
    return int(step) if step.isascii() and step.isdigit() and len(step) < 19 else None


def _resolve(doc: object, steps: list[str | int]) -> tuple[bool, Any]:
    """(found, value) at the path."""
    node = doc
    for step in steps:
        index = _as_index(step)
        if isinstance(node, dict) and isinstance(step, str) and step in node:
            node = node[step]
        elif isinstance(node, list) and index is not None and -len(node) <= index < len(node):
            node = node[index]
        else:
            return False, None
    return True, node


# -- Checks ----------------------------------------------------------------------------------


def check_is_json(value: Any, ctx: Context) -> Result:
    """is-json, with an optional schema; also json-schema, whose validator requires one."""
    doc = load_json(ctx.output)
    if value is MISSING or value is None:
        return binary(True, "output is valid JSON")
    try:
        error = best_match(Draft202012Validator(value).iter_errors(doc))
    except (Unresolvable, RecursionError) as exc:  # e.g. a $ref to a document we never fetch
        return binary(False, f"the schema could not be applied: {exc}")
    if error is None:
        return binary(True, "output is JSON matching the schema")
    message = error.message if len(error.message) <= 200 else error.message[:200] + "…"
    return binary(False, f"output JSON does not match the schema at {error.json_path}: {message}")


def check_json_path(value: dict[str, Any], ctx: Context) -> Result:
    doc = load_json(ctx.output)
    path, expected = value["path"], value["equals"]
    found, actual = _resolve(doc, parse_path(path))
    if not found:
        return binary(False, f"path {path} not found in output JSON {show(doc)}")
    if same_json(actual, expected):
        return binary(True, f"{path} is {show(actual)}")
    return binary(False, f"{path} is {show(actual)}, expected {show(expected)}")


# -- Validators ------------------------------------------------------------------------------


def schema_problems(value: object, *, required: bool) -> list[str]:
    if value is MISSING or value is None:
        return ["value is required (a JSON schema)"] if required else []
    try:
        Draft202012Validator.check_schema(value)
    except SchemaError as exc:
        where = f" (at {exc.json_path})" if exc.path else ""
        return [f"value is not a valid JSON schema: {exc.message}{where}"]
    except Exception as exc:  # odd input can trip jsonschema itself; validation must not raise
        return [f"value could not be checked as a JSON schema: {exc}"]
    return []


def json_path_problems(value: object) -> list[str]:
    problems = object_problems(value, required={"path", "equals"}, optional=set())
    if problems or not isinstance(value["path"], str):
        return problems or [f'value "path" must be a string, got {json_type(value["path"])}']
    try:
        parse_path(value["path"])
    except ValueError as exc:
        return [f"invalid path {quote(value['path'])}: {exc}"]
    return []


# -- contains-json and OpenAI tool calls ------------------------------------------------------

# promptfoo looks at most this far past an opening brace for its closing one.
_MAX_JSON_CHARS = 100_000


def json_objects_in(text: str) -> list[Any]:
    """The JSON objects embedded in text, left to right, as promptfoo's contains-json finds
    them: from each `{`, the shortest balanced span that parses (bounded, so it stays linear
    in practice); the search goes on after each object found."""
    found, decoder, i = [], json.JSONDecoder(), 0
    while (i := text.find("{", i)) != -1:
        try:
            value, end = decoder.raw_decode(text[: i + _MAX_JSON_CHARS], i)
        except (ValueError, RecursionError):
            i += 1
            continue
        found.append(value)
        i = end
    return found


def check_contains_json(value: Any, ctx: Context) -> Result:
    objects = json_objects_in(ctx.output)
    if not objects:
        return binary(False, f"output contains no JSON object; output: {quote(ctx.output)}")
    if value is MISSING or value is None:
        return binary(True, f"output contains JSON {show(objects[0])}")
    validator = Draft202012Validator(value)
    for doc in objects:
        try:
            error = best_match(validator.iter_errors(doc))
        except (Unresolvable, RecursionError) as exc:  # as in check_json_schema
            return binary(False, f"the schema could not be applied: {exc}")
        if error is None:
            return binary(True, f"output contains JSON matching the schema: {show(doc)}")
    return binary(False, f"no JSON object in the output matches the schema: {error.message[:200]}")


def _tool_calls(doc: Any) -> list[Any] | None:
    if isinstance(doc, dict) and "tool_calls" in doc:
        doc = doc["tool_calls"]
    return doc if isinstance(doc, list) and doc else None


def check_openai_tools_call(value: list[dict[str, Any]], ctx: Context) -> Result:
    """The output (JSON: a list of tool calls or {"tool_calls": [...]}) calls only the tools
    in `value` (OpenAI's `tools` list), each with arguments that match its parameters."""
    calls = _tool_calls(load_json(ctx.output))
    if calls is None or any(
        not isinstance(call, dict)
        or not isinstance(call.get("function"), dict)
        or not isinstance(call["function"].get("name"), str)
        or not isinstance(call["function"].get("arguments"), str)
        for call in calls
    ):
        return binary(False, f"output is not a list of OpenAI tool calls: {quote(ctx.output)}")
    tools = {t["function"]["name"]: t["function"] for t in value if t.get("type") == "function"}
    for call in calls:
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        if name not in tools:
            return binary(False, f"the output calls {quote(name)}, which is not among the tools")
        try:
            args = json.loads(arguments)
        except ValueError:
            return binary(False, f"the arguments of {quote(name)} are not JSON: {quote(arguments)}")
        schema = tools[name].get("parameters") or {}
        if (error := best_match(Draft202012Validator(schema).iter_errors(args))) is not None:
            return binary(False, f"the arguments of {quote(name)} do not match: {error.message}")
    return binary(True, f"the output makes {len(calls)} valid tool call(s)")


def tools_problems(value: object) -> list[str]:
    if not isinstance(value, list) or not value:
        return ["value must be a non-empty list of tools, as OpenAI's `tools` parameter"]
    problems = []
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            problems.append(f'value[{i}] must be {{"type": "function", "function": {{"name"...')
        elif (params := function.get("parameters")) is not None:
            problems += [
                f"value[{i}].function.parameters: {p}"
                for p in schema_problems(params, required=True)
            ]
    return problems
