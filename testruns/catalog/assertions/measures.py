"""Assertions on what can be counted or measured: word-count, latency and cost."""

from __future__ import annotations

import math
from decimal import Decimal

from testruns.catalog.assertions.contract import (
    MAX_COUNT,
    MISSING,
    Context,
    Result,
    binary,
    count_problems,
    is_limit,
    object_problems,
    show_typed,
)

# -- Checks ----------------------------------------------------------------------------------


def check_word_count(value: dict[str, int], ctx: Context) -> Result:
    count = len(ctx.output.split())
    low, high = value.get("min", 0), value.get("max")
    wanted = f"at least {low}" if high is None else f"{low} to {high}"
    passed = low <= count and (high is None or count <= high)
    return binary(passed, f"output has {count} words; expected {wanted}")


def check_latency(value: float, ctx: Context) -> Result:
    if ctx.latency_ms is None or not math.isfinite(ctx.latency_ms):
        return binary(False, f"latency was not measured (limit {value:g} ms)")
    verdict = "within" if ctx.latency_ms <= value else "over"
    return binary(
        ctx.latency_ms <= value,
        f"latency {ctx.latency_ms:.0f} ms is {verdict} the limit of {value:g} ms",
    )


def check_cost(value: float, ctx: Context) -> Result:
    # Through str(), so that a float limit of 0.01 means exactly one cent.
    limit = Decimal(str(value))
    cost = None if ctx.cost is None else Decimal(str(ctx.cost))
    if cost is None or not cost.is_finite():
        return binary(False, f"cost was not measured (limit ${limit:f})")
    verdict = "within" if cost <= limit else "over"
    return binary(cost <= limit, f"cost ${cost:f} is {verdict} the limit of ${limit:f}")


# -- Validators ------------------------------------------------------------------------------


def word_count_problems(value: object) -> list[str]:
    problems = object_problems(value, required=set(), optional={"min", "max"})
    if problems or not value:
        return problems or ['value needs "min", "max" or both']
    problems = count_problems(value, "min") + count_problems(value, "max")
    if not problems and value.get("min", 0) > value.get("max", MAX_COUNT):
        problems.append(f'value "min" ({value["min"]}) is more than "max" ({value["max"]})')
    return problems


def limit_problems(value: object) -> list[str]:
    if value is MISSING:
        return ["value is required (a number >= 0)"]
    return [] if is_limit(value) else [f"value must be a number >= 0, got {show_typed(value)}"]
