"""The shapes of what travels to browsers: group names, the run state and result rows an
event or snapshot carries (and the SQL columns behind them), and the two messages.

- `run.event` to the group `run.<id>`: {kind, seq, run_id, data: {run, results,
  more_results}}, the run's whole state and the results finished since its previous event;
- `queue.changed` to the group `queue`: a `snapshots.queue_state()`, nothing private.

Plain data and SQL fragments only: publishing is `live.publish`, reading `live.snapshots`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

QUEUE_GROUP = "queue"
# At most this many results ride on one event; the page fetches the rest (`more_results`).
EVENT_RESULT_LIMIT = 200
TEXT_PREVIEW = 500
DONE = ("passed", "failed", "error", "skipped")

RUN_STATE = [
    "seq",
    "status",
    "phase",
    "total_cases",
    "done_count",
    "passed_count",
    "failed_count",
    "error_count",
    "tokens_in",
    "tokens_out",
    "cost",
    "calls_done",
    "calls_total",
]
# Columns of the run row behind RUN_STATE (cost as a float: events travel as msgpack).
RUN_STATE_COLUMNS = (
    "event_seq, status, phase, total_cases, done_count, passed_count, "
    "failed_count, error_count, tokens_in, tokens_out, cost::float8, calls_done, "
    "total_cases * GREATEST(repeats, 1)"
)
RESULT_ROW = [
    "id",
    "position",
    "case_name",
    "status",
    "output",
    "error",
    "latency_ms",
    "tokens_in",
    "tokens_out",
    "cost",
    "assertion_results",
    "attempts",
    "retries",
    "cached",
    "repeats",
]
# Each repeat's verdict and the start of its output (pass^N runs), for the page's compact
# "repeat 1 ✓ 2 ✗" line; the whole outputs are on the report.
REPEATS_PREVIEW = (
    "COALESCE((SELECT jsonb_agg(jsonb_build_object('passed', e.r->'passed', 'output', "
    "left(e.r->>'output', {preview})) ORDER BY e.n) FROM jsonb_array_elements(CASE WHEN "
    "jsonb_typeof({p}repeat_results) = 'array' THEN {p}repeat_results ELSE '[]' END) "
    "WITH ORDINALITY AS e(r, n)), '[]'::jsonb)"
)


def run_group(run_id: int) -> str:
    return f"run.{run_id}"


def result_columns(alias: str = "") -> str:
    """The columns of a result row as pages see it (long texts cut to a preview)."""
    p = f"{alias}." if alias else ""
    return (
        f"{p}id, {p}position, {p}case_name, {p}status, left({p}output, {TEXT_PREVIEW}), "
        f"left({p}error, {TEXT_PREVIEW}), {p}latency_ms, {p}tokens_in, {p}tokens_out, "
        f"{p}cost::float8, {p}assertion_results, {p}attempts, {p}retries, {p}cached, "
        + REPEATS_PREVIEW.format(p=p, preview=TEXT_PREVIEW)
    )


def result_row(values: Sequence) -> dict:
    """A row of result_columns() as pages see it (jsonb arrives as text from Django's
    psycopg connection)."""
    row = dict(zip(RESULT_ROW, values, strict=True))
    for name in ("assertion_results", "repeats"):
        if isinstance(row[name], str):
            row[name] = json.loads(row[name])
    return row


def run_state(values: Sequence) -> dict:
    """A row of RUN_STATE_COLUMNS as named values (RUN_STATE), `seq` included."""
    return dict(zip(RUN_STATE, values, strict=True))


def run_event_message(run_id: int, kind: str, state: dict, results: list[dict]) -> dict:
    """A `run.event`: the run's state (a run_state(), whose `seq` moves to the top level)
    and the results finished since the previous event, by position, the latest
    EVENT_RESULT_LIMIT of them."""
    state = dict(state)
    return {
        "type": "run.event",
        "kind": kind,
        "seq": state.pop("seq"),
        "run_id": run_id,
        "data": {
            "run": state,
            "results": results[-EVENT_RESULT_LIMIT:],
            "more_results": max(0, len(results) - EVENT_RESULT_LIMIT),
        },
    }


def queue_changed_message(queue: dict) -> dict:
    """A `queue.changed` broadcast of one `snapshots.queue_state()`."""
    return {"type": "queue.changed", **queue}
