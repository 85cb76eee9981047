"""Fan-out that does not grow with watchers (CHANNEL_LAYER=pubsub): 200 pages on one run,
through a real daphne and Redis, each receive every event once and in order, while Redis
carries one subscription for the whole web process; and a page that reconnects catches up
from its snapshot."""

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
from testruns.engine import launching
from testruns.live import publish, wire
from tests.conftest import ChildProcess, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def pubsub_server(process_env, settings):
    """daphne serving with the pub/sub channel layer, and this process publishing with it."""
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


PAGES = 200
EVENTS = 20


async def open_page(url: str, headers: dict[str, str]) -> tuple[ClientConnection, int]:
    """Connect as the run page does and read its snapshot; returns the socket and the
    snapshot's sequence number."""
    ws = await connect(url, additional_headers=headers, max_queue=None, open_timeout=30)
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if message["type"] == "snapshot":
            return ws, message["seq"]


async def events_until(ws: ClientConnection, last_seq: int) -> list[int]:
    """The sequence numbers of the run events this page receives, until `last_seq`."""
    seen: list[int] = []
    while not seen or seen[-1] < last_seq:
        message = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if "seq" in message and message["type"] != "snapshot":
            seen.append(message["seq"])
    return seen


def emit(run_id: int, count: int) -> None:
    """What a worker does as cases finish: one numbered event per transaction."""
    for _ in range(count):
        with transaction.atomic():
            publish.announce(run_id, kind="progress")


def group_subscribers(run_id: int) -> int:
    channel = f"asgi__group__{wire.run_group(run_id)}"
    return redis.Redis.from_url(settings.REDIS_URL).pubsub_numsub(channel)[0][1]


def test_two_hundred_pages_get_every_event_once_in_order_through_one_subscription(
    pubsub_server, session_cookie, launcher, make_card, simulator
):
    asgi_server = pubsub_server
    run = launching.launch_run(card=make_card(), provider=simulator, user=launcher)
    url = f"ws://{asgi_server}/ws/runs/{run.pk}/"
    headers = {"Cookie": session_cookie, "Origin": f"http://{asgi_server}"}

    async def watch() -> None:
        pages = await asyncio.gather(*(open_page(url, headers) for _ in range(PAGES)))
        start = {seq for _, seq in pages}
        assert len(start) == 1  # every page starts from the same state
        (first,) = start
        # 200 pages, one web process: Redis holds one subscription to the run's group.
        assert group_subscribers(run.pk) == 1

        await asyncio.to_thread(emit, run.pk, EVENTS // 2)
        leaving, _ = pages[0]
        middle = first + EVENTS // 2
        assert await events_until(leaving, middle) == list(range(first + 1, middle + 1))
        await leaving.close()

        await asyncio.to_thread(emit, run.pk, EVENTS - EVENTS // 2)
        last = first + EVENTS
        received = await asyncio.gather(*(events_until(ws, last) for ws, _ in pages[1:]))
        for seqs in received:
            assert seqs == list(range(first + 1, last + 1))  # each once, in order

        # The page that left comes back: its snapshot has everything it missed.
        back, seq = await open_page(url, headers)
        assert seq == last
        await back.close()
        await asyncio.gather(*(ws.close() for ws, _ in pages[1:]))

    asyncio.run(watch())
