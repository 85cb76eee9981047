"""The WebSocket consumers through the real ASGI stack (origin check, session auth, routing)
with Channels' WebsocketCommunicator, the real channel layer (Redis) and PostgreSQL."""

from __future__ import annotations

import pytest
import redis
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from channels_redis.core import RedisChannelLayer
from django.conf import settings
from django.db import transaction
from django.db.models import F
from redis._defaults import DEFAULT_SOCKET_TIMEOUT

from project.asgi import application
from testruns.engine import gate, launching, limits
from testruns.live import wire
from testruns.live.publish import announce
from testruns.models import TestResult, TestRun

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 10


def cookie_for(client, user) -> str:
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


def communicator(path: str, cookie: str | None) -> WebsocketCommunicator:
    headers = [(b"origin", b"http://127.0.0.1")]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    return WebsocketCommunicator(application, path, headers=headers)


def group_size(group: str) -> int:
    """Members of a group as Redis sees them: with the list layer, every page's channel; with
    pub/sub, one subscription per web process (here, this one) that has a page in it."""
    layer = get_channel_layer()
    client = redis.Redis.from_url(settings.REDIS_URL)
    if isinstance(layer, RedisChannelLayer):
        return client.zcard(layer._group_key(group))
    return client.pubsub_numsub(f"asgi__group__{group}")[0][1]


def run_limit(limit: int, provider) -> None:
    limits.ensure_semaphores(provider)
    limits.set_limit(gate.RUNS, limit)


@sync_to_async
def finish_case(run_id: int, position: int, *, output: str = "done", publish: bool = True):
    """What a worker does for one case, in one transaction: the result, the totals, the
    event (published after commit unless `publish` is off, as if the message were lost)."""
    with transaction.atomic():
        TestResult.objects.filter(run_id=run_id, position=position).update(
            status="passed", output=output, latency_ms=12.5, tokens_in=3, tokens_out=4
        )
        TestRun.objects.filter(pk=run_id).update(
            done_count=F("done_count") + 1, passed_count=F("passed_count") + 1
        )
        if publish:
            announce(run_id, kind="progress")
        else:
            TestRun.objects.filter(pk=run_id).update(event_seq=F("event_seq") + 1)


async def receive_until(ws: WebsocketCommunicator, predicate) -> list[dict]:
    messages = []
    while True:
        message = await ws.receive_json_from(timeout=TIMEOUT)
        messages.append(message)
        if predicate(message):
            return messages


def test_anonymous_and_unauthorized_users_are_closed_with_4403(
    client, launcher, django_user_model, make_card, simulator
):
    run = launching.launch_run(card=make_card(), provider=simulator, user=launcher)
    stranger = django_user_model.objects.create_user("stranger", password="pw-stranger-1")
    stranger_cookie = cookie_for(client, stranger)

    async def scenario():
        for path, cookie in [
            (f"/ws/runs/{run.pk}/", None),
            (f"/ws/runs/{run.pk}/", stranger_cookie),
            ("/ws/runs/999999/", stranger_cookie),
            ("/ws/dashboard/", None),
        ]:
            ws = communicator(path, cookie)
            await ws.connect()
            closed = await ws.receive_output(timeout=TIMEOUT)
            assert closed == {"type": "websocket.close", "code": 4403}, path
            # Refused in connect(), before joining: the run's group has no member.
            assert group_size(wire.run_group(run.pk)) == 0
            await ws.disconnect()

    async_to_sync(scenario)()


def test_snapshot_then_deltas_numbered_by_the_run_sequence(
    launcher, session_cookie, make_card, simulator
):
    run = launching.launch_run(card=make_card(cases=3), provider=simulator, user=launcher)

    async def scenario():
        ws = communicator(f"/ws/runs/{run.pk}/", session_cookie)
        assert (await ws.connect())[0]
        snapshot = await ws.receive_json_from(timeout=TIMEOUT)
        assert snapshot["type"] == "snapshot" and snapshot["results"] == []
        assert group_size(wire.run_group(run.pk)) == 1
        assert snapshot["run"]["total_cases"] == 3 and snapshot["run"]["done_count"] == 0
        seq = snapshot["seq"]
        assert seq == await sync_to_async(lambda: TestRun.objects.get(pk=run.pk).event_seq)()

        await finish_case(run.pk, 0, output="<b>first</b>")
        event = await ws.receive_json_from(timeout=TIMEOUT)
        assert (event["type"], event["seq"]) == ("progress", seq + 1)
        assert event["data"]["run"]["done_count"] == 1
        [row] = event["data"]["results"]
        assert (row["position"], row["output"], row["tokens_in"]) == (0, "<b>first</b>", 3)

        await finish_case(run.pk, 1)
        event = await ws.receive_json_from(timeout=TIMEOUT)
        assert event["seq"] == seq + 2
        assert [r["position"] for r in event["data"]["results"]] == [1]  # only what is new
        await ws.disconnect()

    async_to_sync(scenario)()


def test_a_gap_in_sequence_numbers_is_repaired_by_a_resync_snapshot(
    launcher, session_cookie, make_card, simulator
):
    run = launching.launch_run(card=make_card(cases=3), provider=simulator, user=launcher)

    async def scenario():
        ws = communicator(f"/ws/runs/{run.pk}/", session_cookie)
        await ws.connect()
        seq = (await ws.receive_json_from(timeout=TIMEOUT))["seq"]
        await finish_case(run.pk, 0, publish=False)  # an event that never arrives
        await finish_case(run.pk, 1)
        event = await ws.receive_json_from(timeout=TIMEOUT)
        assert event["seq"] == seq + 2  # the page sees the gap...
        await ws.send_json_to({"type": "resync"})  # ...and asks for a snapshot
        snapshot = await ws.receive_json_from(timeout=TIMEOUT)
        assert snapshot["type"] == "snapshot" and snapshot["seq"] == seq + 2
        assert [r["position"] for r in snapshot["results"]] == [0, 1]
        assert snapshot["run"]["done_count"] == 2
        await ws.disconnect()

    async_to_sync(scenario)()


def test_waiting_page_derives_its_position_from_the_queue_broadcast(
    client, launcher, session_cookie, make_card, simulator
):
    run_limit(1, simulator)
    card = make_card()
    first = launching.launch_run(card=card, provider=simulator, user=launcher)
    second = launching.launch_run(card=card, provider=simulator, user=launcher)
    third = launching.launch_run(card=card, provider=simulator, user=launcher)
    assert TestRun.objects.get(pk=first.pk).status == "running"

    async def scenario():
        ws = communicator(f"/ws/runs/{third.pk}/", session_cookie)
        await ws.connect()
        snapshot = await ws.receive_json_from(timeout=TIMEOUT)
        assert snapshot["run"]["status"] == "queued"
        assert (snapshot["queue"]["position"], snapshot["queue"]["waiting"]) == (2, 2)
        assert snapshot["queue"]["slots"] == [1, 1]

        await sync_to_async(launching.cancel_run)(second)
        update = await ws.receive_json_from(timeout=TIMEOUT)
        # Only the queue, and nothing private: no card, user or output.
        assert set(update) == {"type", "version", "position", "waiting", "slots"}
        assert (update["type"], update["position"], update["waiting"]) == ("queue", 1, 1)
        assert update["version"] > snapshot["queue"]["version"]

        await sync_to_async(launching.cancel_run)(first)  # frees the slot: third starts
        messages = await receive_until(
            ws, lambda m: m.get("data", {}).get("run", {}).get("status") == "running"
        )
        assert all(m.get("position") is None for m in messages if m["type"] == "queue")
        await ws.disconnect()

    async_to_sync(scenario)()


def test_queue_broadcasts_overtaken_by_newer_ones_are_dropped(
    launcher, session_cookie, make_card, simulator
):
    run_limit(1, simulator)
    card = make_card()
    launching.launch_run(card=card, provider=simulator, user=launcher)
    waiting = launching.launch_run(card=card, provider=simulator, user=launcher)
    layer = get_channel_layer()

    async def scenario():
        ws = communicator(f"/ws/runs/{waiting.pk}/", session_cookie)
        await ws.connect()
        version = (await ws.receive_json_from(timeout=TIMEOUT))["queue"]["version"]
        stale = {
            "type": "queue.changed",
            "version": version - 1,
            "waiting": [[1, 0], [2, 0], [waiting.pk, 0]],
            "running": [],
            "slots": [1, 1],
        }
        await layer.group_send(wire.QUEUE_GROUP, stale)
        newer = dict(stale, version=version + 1, waiting=[[1, 9], [waiting.pk, 0]])
        await layer.group_send(wire.QUEUE_GROUP, newer)
        update = await ws.receive_json_from(timeout=TIMEOUT)
        assert (update["version"], update["position"]) == (version + 1, 2)
        # A newer broadcast that changes nothing for this page is not sent to it.
        await layer.group_send(
            wire.QUEUE_GROUP, dict(newer, version=version + 2, waiting=[[3, 9], [waiting.pk, 0]])
        )
        assert await ws.receive_nothing(timeout=0.2)
        await ws.disconnect()

    async_to_sync(scenario)()


def test_dashboard_gets_queue_broadcasts_and_progress_of_visible_runs_only(
    client, launcher, django_user_model, make_card, simulator
):
    run_limit(2, simulator)
    mine = launching.launch_run(card=make_card(cases=2), provider=simulator, user=launcher)
    stranger = django_user_model.objects.create_user("stranger", password="pw-stranger-1")
    theirs = launching.launch_run(
        card=make_card("secret", cases=2), provider=simulator, user=stranger
    )
    cookie = cookie_for(client, launcher)

    async def scenario():
        ws = communicator("/ws/dashboard/", cookie)
        await ws.connect()
        snapshot = await ws.receive_json_from(timeout=TIMEOUT)
        assert [r["id"] for r in snapshot["running"]] == [mine.pk]
        assert snapshot["slots"][0]["in_use"] == 2

        await finish_case(theirs.pk, 0, output="secret output")
        await finish_case(mine.pk, 0, output="my output")
        event = await ws.receive_json_from(timeout=TIMEOUT)
        assert (event["type"], event["run_id"]) == ("run", mine.pk)  # not the stranger's
        assert event["run"]["done_count"] == 1 and "results" not in event

        queued = await sync_to_async(launching.launch_run)(
            card=await sync_to_async(lambda: mine.card)(),
            provider=simulator,
            user=stranger,
            priority=3,
        )
        update = await receive_until(ws, lambda m: m["type"] == "queue")
        assert update[-1]["waiting"] == [[queued.pk, 3]] and update[-1]["slots"] == [2, 2]
        assert await ws.receive_nothing(timeout=0.2)
        await ws.disconnect()

    async_to_sync(scenario)()


def test_list_layer_reads_outlast_its_blocking_receive():
    """channels_redis' list layer (CHANNEL_LAYER=list) waits for messages with a blocking
    BZPOPMIN; a socket timeout at or below its timeout kills every consumer that stays idle
    that long (close 1011)."""

    layer = RedisChannelLayer(**settings.CHANNEL_LAYER_LIST["CONFIG"])
    kwargs = layer.create_pool(0).connection_kwargs
    timeout = kwargs.get("socket_timeout", DEFAULT_SOCKET_TIMEOUT)
    assert timeout is None or timeout > layer.brpop_timeout
