"""The one place that publishes to browsers.

State changes are written first. `announce` numbers an event for its run in the same
transaction (the run's `event_seq`) and publishes it only after commit, so a page never
hears of something the database does not hold. Every event carries the run's whole state
and the results finished since the previous event, so a page that misses one catches up
with the next. Progress is coalesced: at most one progress event per run per
PROGRESS_INTERVAL, however fast cases finish; status changes are always sent, and the
sweeper flushes what a quiet spell left unannounced. A failed publish is logged and never
fails the caller: pages resynchronise from a snapshot.
"""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection, transaction

log = logging.getLogger(__name__)

QUEUE_GROUP = "queue"
PUBLISH_TIMEOUT_SECONDS = 2.0
PROGRESS_INTERVAL_MS = 250
EVENT_RESULT_LIMIT = 200
TEXT_PREVIEW = 500
DONE = ("passed", "failed", "error", "skipped")

RUN_STATE = ["seq", "status", "phase", "total_cases", "done_count", "passed_count",
             "failed_count", "error_count"]
RESULT_ROW = ["id", "position", "case_name", "status", "output", "error", "latency_ms"]


def run_group(run_id: int) -> str:
    return f"run.{run_id}"


def result_columns(alias: str = "") -> str:
    """The columns of a result row as pages see it (long texts cut to a preview)."""
    p = f"{alias}." if alias else ""
    return (f"{p}id, {p}position, {p}case_name, {p}status, left({p}output, {TEXT_PREVIEW}), "
            f"left({p}error, {TEXT_PREVIEW}), {p}latency_ms")


def announce(run_id: int, *, kind: str = "status", force: bool = True) -> None:
    """Inside the caller's transaction: unless coalesced away (force=False and the run had
    an event less than PROGRESS_INTERVAL_MS ago), take the run's next sequence number,
    collect the results finished since its last event, and publish after commit."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE testruns_testrun SET event_seq = event_seq + 1, "
            "last_event_at = clock_timestamp() WHERE id = %s AND (%s OR last_event_at IS NULL "
            "OR last_event_at < clock_timestamp() - make_interval(secs => %s)) "
            "RETURNING event_seq, status, phase, total_cases, done_count, passed_count, "
            "failed_count, error_count",
            [run_id, force, PROGRESS_INTERVAL_MS / 1000])
        row = cursor.fetchone()
        if row is None:
            return
        state = dict(zip(RUN_STATE, row, strict=True))
        cursor.execute(
            f"UPDATE testruns_testresult SET announced_seq = %s WHERE run_id = %s "
            f"AND announced_seq IS NULL AND status = ANY(%s) RETURNING {result_columns()}",
            [state["seq"], run_id, list(DONE)])
        results = sorted((dict(zip(RESULT_ROW, r, strict=True)) for r in cursor.fetchall()),
                         key=lambda r: r["position"])
    message = {
        "type": "run.event", "kind": kind, "seq": state.pop("seq"), "run_id": run_id,
        "data": {"run": state, "results": results[-EVENT_RESULT_LIMIT:],
                 "more_results": max(0, len(results) - EVENT_RESULT_LIMIT)},
    }
    transaction.on_commit(lambda: publish(run_group(run_id), message))


def flush_unannounced() -> int:
    """For the sweeper: announce results that finished during a quiet spell (coalescing
    skipped them and no later event carried them)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT run_id FROM testruns_testresult WHERE announced_seq IS NULL "
            "AND status = ANY(%s)", [list(DONE)])
        run_ids = [row[0] for row in cursor.fetchall()]
    for run_id in run_ids:
        with transaction.atomic():
            announce(run_id, kind="progress", force=False)
    return len(run_ids)


def publish_queue_changed() -> None:
    transaction.on_commit(lambda: publish(QUEUE_GROUP, {"type": "queue.changed"}))


def publish(group: str, message: dict) -> None:
    try:
        loop_thread = _worker_event_loop()
        if loop_thread is not None:
            # In a Dramatiq worker: reuse its one event loop, hence one Redis connection pool.
            loop_thread.run_coroutine(_send(group, message))
        else:
            async_to_sync(_send)(group, message)
    except Exception:
        log.warning("publish to %s failed", group, exc_info=True)


async def _send(group: str, message: dict) -> None:
    layer = get_channel_layer()
    if layer is not None:
        await asyncio.wait_for(layer.group_send(group, message), PUBLISH_TIMEOUT_SECONDS)


def _worker_event_loop():
    from dramatiq.asyncio import get_event_loop_thread

    return get_event_loop_thread()
