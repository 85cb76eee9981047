"""Fan-out that does not grow with watchers (the pub/sub channel layer, `testruns.live.layer`):
200 pages on one run, through a real daphne and Redis, each receive every event once and in
order, while Redis carries one subscription for the whole web process; a page that
reconnects catches up from its snapshot; waiting pages each derive their new place from one
queue broadcast; and a web process decodes a group message once, however many of its pages
are in the group."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
import redis
from django.conf import settings
from django.db import transaction
from websockets.asyncio.client import ClientConnection, connect

from project.embedded import free_port, port_is_open
from testruns.engine import gate, launching, limits
from testruns.live import publish, wire
from testruns.live.layer import PubSubChannelLayer
from tests.conftest import ChildProcess, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

PAGES = 200
EVENTS = 20
WAITING = 50
RECEIVE_DEADLINE = 30  # seconds any one message may take before the test fails


@pytest.fixture
def pubsub_server(process_env, settings):
    """daphne serving with the pub/sub channel layer, and this process publishing with it
    (whatever CHANNEL_LAYER says: this test is about that layer)."""
    settings.CHANNEL_LAYERS = {"default": settings.CHANNEL_LAYER_PUBSUB}
    port = free_port()
    server = ChildProcess(
        "daphne-pubsub",
        [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "project.asgi:application",
        ],
        process_env | {"CHANNEL_LAYER": "pubsub"},
    )
    wait_for(
        lambda: port_is_open(port) or server.process.poll() is not None,
        timeout=60,
        what="daphne to listen",
    )
    assert server.process.poll() is None, server.output()
    yield f"127.0.0.1:{port}"
    server.stop()


async def receive(ws: ClientConnection) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_DEADLINE))


async def open_page(url: str, headers: dict[str, str]) -> tuple[ClientConnection, dict]:
    """Connect as the run page does and read its snapshot."""
    ws = await connect(url, additional_headers=headers, max_queue=None, open_timeout=30)
    while True:
        message = await receive(ws)
        if message["type"] == "snapshot":
            return ws, message


async def events_until(ws: ClientConnection, last_seq: int) -> list[int]:
    """The sequence numbers of the run events this page receives, until `last_seq`."""
    seen: list[int] = []
    while not seen or seen[-1] < last_seq:
        message = await receive(ws)
        if "seq" in message and message["type"] != "snapshot":
            seen.append(message["seq"])
    return seen


def emit(run_id: int, count: int) -> None:
    """What a worker does as cases finish: one numbered event per transaction."""
    for _ in range(count):
        with transaction.atomic():
            publish.announce(run_id, kind="progress")


def subscribers(channel: str) -> int:
    return redis.Redis.from_url(settings.REDIS_URL).pubsub_numsub(channel)[0][1]


def group_subscribers(run_id: int) -> int:
    return subscribers(f"asgi__group__{wire.run_group(run_id)}")


def test_two_hundred_pages_get_every_event_once_in_order_through_one_subscription(
    pubsub_server, session_cookie, launcher, make_card, simulator
):
    run = launching.launch_run(card=make_card(), provider=simulator, user=launcher)
    url = f"ws://{pubsub_server}/ws/runs/{run.pk}/"
    headers = {"Cookie": session_cookie, "Origin": f"http://{pubsub_server}"}

    async def watch() -> None:
        opened = await asyncio.gather(*(open_page(url, headers) for _ in range(PAGES)))
        pages = [ws for ws, _ in opened]
        start = {snapshot["seq"] for _, snapshot in opened}
        assert len(start) == 1  # every page starts from the same state
        (first,) = start
        # 200 pages, one web process: Redis holds one subscription to the run's group.
        assert group_subscribers(run.pk) == 1

        await asyncio.to_thread(emit, run.pk, EVENTS // 2)
        leaving = pages[0]
        middle = first + EVENTS // 2
        assert await events_until(leaving, middle) == list(range(first + 1, middle + 1))
        await leaving.close()

        await asyncio.to_thread(emit, run.pk, EVENTS - EVENTS // 2)
        last = first + EVENTS
        received = await asyncio.gather(*(events_until(ws, last) for ws in pages[1:]))
        for seqs in received:
            assert seqs == list(range(first + 1, last + 1))  # each once, in order

        # The page that left comes back: its snapshot has everything it missed, and the
        # events after it arrive as they do on every other page.
        back, snapshot = await open_page(url, headers)
        assert snapshot["seq"] == last
        await asyncio.to_thread(emit, run.pk, 1)
        for seqs in await asyncio.gather(
            *(events_until(ws, last + 1) for ws in [back, *pages[1:]])
        ):
            assert seqs == [last + 1]
        await asyncio.gather(*(ws.close() for ws in [back, *pages[1:]]))

    asyncio.run(watch())


def test_waiting_pages_each_get_their_new_place_from_one_queue_broadcast(
    pubsub_server, session_cookie, launcher, make_card, simulator
):
    limits.ensure_semaphores(simulator)
    limits.set_limit(gate.RUNS, 1)
    card = make_card()
    running = launching.launch_run(card=card, provider=simulator, user=launcher)
    waiting = [
        launching.launch_run(card=card, provider=simulator, user=launcher) for _ in range(WAITING)
    ]
    headers = {"Cookie": session_cookie, "Origin": f"http://{pubsub_server}"}

    async def next_place(ws: ClientConnection) -> int:
        """The page's next place in the queue; 0 once its run has started."""
        while True:
            message = await receive(ws)
            if message["type"] == "queue" and message["position"] is not None:
                return message["position"]
            if message["type"] == "status" and message["data"]["run"]["status"] == "running":
                return 0

    async def watch() -> None:
        opened = await asyncio.gather(
            *(open_page(f"ws://{pubsub_server}/ws/runs/{run.pk}/", headers) for run in waiting)
        )
        assert [snapshot["queue"]["position"] for _, snapshot in opened] == list(
            range(1, WAITING + 1)
        )
        # One subscription to the queue group for all the waiting pages of the process.
        assert subscribers(f"asgi__group__{wire.QUEUE_GROUP}") == 1

        await asyncio.to_thread(launching.cancel_run, running)  # a slot frees
        places = await asyncio.gather(*(next_place(ws) for ws, _ in opened))
        assert places == list(range(WAITING))  # the first runs, every other moves up one
        await asyncio.gather(*(ws.close() for ws, _ in opened))

    asyncio.run(watch())


def test_a_web_process_decodes_a_group_message_once_for_all_its_members():
    """Every member of a group in one process gets the same decoded message: the work per
    event is one decode per process, not one per page. A message to one channel is that
    channel's own."""
    layer = PubSubChannelLayer(**settings.CHANNEL_LAYER_PUBSUB["CONFIG"])
    group = "test.shared"

    async def scenario() -> None:
        members = [await layer.new_channel() for _ in range(3)]
        for channel in members:
            await layer.group_add(group, channel)
        await asyncio.to_thread(
            wait_for, lambda: subscribers(f"asgi__group__{group}") == 1, what="the subscription"
        )
        message = {"type": "queue.changed", "version": 7, "waiting": [[1, 0], [2, 5]]}
        await layer.group_send(group, message)
        received = [await asyncio.wait_for(layer.receive(c), RECEIVE_DEADLINE) for c in members]
        assert received[0] == message
        assert all(copy is received[0] for copy in received)

        await layer.send(members[0], {"type": "run.event", "seq": 1})
        assert await asyncio.wait_for(layer.receive(members[0]), RECEIVE_DEADLINE) == {
            "type": "run.event",
            "seq": 1,
        }
        await layer.flush()

    asyncio.run(scenario())


def test_a_web_process_that_loses_its_subscriptions_subscribes_again(
    pubsub_server, session_cookie, launcher, make_card, simulator
):
    """Redis drops the web process's pub/sub connection (a restart, a network cut): the
    process connects and subscribes again, and its pages get the events after that."""
    run = launching.launch_run(card=make_card(), provider=simulator, user=launcher)
    url = f"ws://{pubsub_server}/ws/runs/{run.pk}/"
    headers = {"Cookie": session_cookie, "Origin": f"http://{pubsub_server}"}

    async def watch() -> None:
        ws, snapshot = await open_page(url, headers)
        first = snapshot["seq"]
        assert redis.Redis.from_url(settings.REDIS_URL).client_kill_filter(_type="pubsub") >= 1
        await asyncio.to_thread(
            wait_for, lambda: group_subscribers(run.pk) == 1, what="daphne to subscribe again"
        )
        await asyncio.to_thread(emit, run.pk, 1)
        assert await events_until(ws, first + 1) == [first + 1]
        await ws.close()

    asyncio.run(watch())
