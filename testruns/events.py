"""The one place that publishes to browsers.

State changes are written first; `record_run_event` bumps the run's sequence number in the
same transaction and sends the event only after commit, so a page never hears of something
the database does not hold. A failed publish is logged and never fails the caller: pages
resynchronise from a snapshot.
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


def run_group(run_id: int) -> str:
    return f"run.{run_id}"


def record_run_event(run_id: int, kind: str, data: dict) -> None:
    """Number this event for its run and publish it after the surrounding commit."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE testruns_testrun SET event_seq = event_seq + 1 WHERE id = %s "
            "RETURNING event_seq",
            [run_id],
        )
        (seq,) = cursor.fetchone()
    message = {"type": "run.event", "kind": kind, "seq": seq, "run_id": run_id, "data": data}
    transaction.on_commit(lambda: publish(run_group(run_id), message))


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
