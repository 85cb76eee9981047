"""The one place that publishes to browsers.

State changes are written first. `announce` numbers an event for its run in the same
transaction (the run's `event_seq`) and publishes it only after commit, so a page never
hears of something the database does not hold. Every event carries the run's whole state
and the results finished since the previous event, so a page that misses one catches up
with the next. Progress is coalesced: at most one progress event per run per
PROGRESS_INTERVAL, however fast cases finish; status changes are always sent, and the
sweeper flushes what a quiet spell left unannounced. A failed publish is logged and never
fails the caller: pages resynchronise from a snapshot.

Called only from services and actors (the engine); the messages' shapes are `live.wire`'s.
"""

from __future__ import annotations

import asyncio
import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection, transaction
from dramatiq.asyncio import get_event_loop_thread

from testruns.live import wire
from testruns.live.snapshots import queue_state

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_SECONDS = 2.0
PROGRESS_INTERVAL_MS = 250


def announce(run_id: int, *, kind: str = "status", force: bool = True) -> None:
    """Inside the caller's transaction: unless coalesced away (force=False and the run had
    an event less than PROGRESS_INTERVAL_MS ago), take the run's next sequence number,
    collect the results finished since its last event, and publish after commit."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE testruns_testrun SET event_seq = event_seq + 1, "
            "last_event_at = clock_timestamp() WHERE id = %s AND (%s OR last_event_at IS NULL "
            "OR last_event_at < clock_timestamp() - make_interval(secs => %s)) "
            f"RETURNING {wire.RUN_STATE_COLUMNS}",
            [run_id, force, PROGRESS_INTERVAL_MS / 1000],
        )
        row = cursor.fetchone()
        if row is None:
            return
        state = wire.run_state(row)
        cursor.execute(
            f"UPDATE testruns_testresult SET announced_seq = %s WHERE run_id = %s "
            f"AND announced_seq IS NULL AND status = ANY(%s) RETURNING {wire.result_columns()}",
            [state["seq"], run_id, list(wire.DONE)],
        )
        results = sorted(map(wire.result_row, cursor.fetchall()), key=lambda r: r["position"])
    message = wire.run_event_message(run_id, kind, state, results)
    transaction.on_commit(lambda: publish(wire.run_group(run_id), message))


def flush_unannounced() -> int:
    """For the sweeper: announce results that finished during a quiet spell (coalescing
    skipped them and no later event carried them)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT run_id FROM testruns_testresult WHERE announced_seq IS NULL "
            "AND status = ANY(%s)",
            [list(wire.DONE)],
        )
        run_ids = [row[0] for row in cursor.fetchall()]
    for run_id in run_ids:
        with transaction.atomic():
            announce(run_id, kind="progress", force=False)
    return len(run_ids)


def publish_queue_changed() -> None:
    """After commit, broadcast the waiting queue once to the queue group: every waiting page
    derives its own position from it, and dashboards their lists and slot counts. It holds
    only run ids, priorities and slot counts, nothing private, and a version so that a page
    keeps the newest of broadcasts that arrive out of order."""
    # One broadcast per transaction, however many changes it made to the queue: skip if one
    # is already registered in this savepoint or an enclosing one (a rollback that drops it
    # drops this change too).
    if connection.in_atomic_block:
        active = set(connection.savepoint_ids)
        if any(
            callback is publish_queue_state and sids <= active
            for sids, callback, _ in connection.run_on_commit
        ):
            return
    transaction.on_commit(publish_queue_state)


def publish_queue_state() -> None:
    """Read the queue now and broadcast it (what publish_queue_changed runs after commit)."""
    try:
        state = queue_state()
    except Exception:  # a broadcast never fails the launch, promotion or cancel behind it
        log.warning("reading the queue for a broadcast failed", exc_info=True)
        return
    publish(wire.QUEUE_GROUP, wire.queue_changed_message(state))


def publish(group: str, message: dict) -> None:
    """Send one message to a group through the channel layer; log, never raise, on failure."""
    try:
        loop_thread = get_event_loop_thread()
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
