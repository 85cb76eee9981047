"""How a web process hands a message to each of its pages, at the least cost per page.

With the pub/sub layer (`live.layer`) an event reaches a web process once, whatever the
number of pages watching; what is left to grow with the pages is the work per page, on one
event loop per process. A profile of daphne with 200 pages on one run (docs/benchmarks.md,
"Live pages") put about half of each page message in Channels' and the server's machinery
rather than in sending it; `LiveConsumer` removes the parts of that machinery these
consumers do not need, and `run_page_text` encodes an event once for all its pages.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections import OrderedDict

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer

from testruns.live.layer import PubSubChannelLayer


class LiveConsumer(AsyncJsonWebsocketConsumer):
    """An AsyncJsonWebsocketConsumer with a lighter way from a message to its handler, on the
    pub/sub layer. Handlers must reach the database only through database_sync_to_async.

    On channels_redis' list layer (CHANNEL_LAYER=list) it is Channels' consumer as it was:
    that layer's receive, cancelled while it opens a Redis connection, loses the cancellation
    (redis-py 8) and polls on for ever, so a page that left at once left a consumer behind
    (tests/test_consumers.py, refused pages). Channels' slower way between messages keeps
    that window rare; on the list layer it stays."""

    lean = False

    async def __call__(self, scope, receive, send) -> None:
        """As AsyncConsumer.__call__, but each source of messages (the socket, the channel
        layer) has one task awaiting its next message directly, and a lock keeps handlers to
        one at a time, as Channels does. Channels waits on both sources anew for each
        message (asyncio.wait, then a new task): about a fifth of what a page message cost."""
        layer = get_channel_layer(self.channel_layer_alias)
        if not isinstance(layer, PubSubChannelLayer):
            await super().__call__(scope, receive, send)
            return
        self.lean = True
        self.scope = scope
        self.channel_layer = layer
        self.channel_name = await layer.new_channel()
        self.channel_receive = functools.partial(layer.receive, self.channel_name)
        self.base_send = send
        turn = asyncio.Lock()

        async def pump(source) -> None:
            while True:
                message = await source()
                async with turn:
                    await self.dispatch(message)

        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(pump(receive))
                tasks.create_task(pump(self.channel_receive))
        except* StopConsumer:
            pass  # the socket closed: the other pump was cancelled, as Channels does

    async def dispatch(self, message) -> None:
        """Straight to the handler. Channels' own dispatch first closes stale database
        connections in its one thread for synchronous code: for a broadcast that 500 pages
        of a process receive, 500 hops through one thread in a row, most of the time the
        last page waited. database_sync_to_async closes them in its own thread anyway."""
        if not self.lean:
            await super().dispatch(message)
            return
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)


# Run events encoded for run pages, the latest last, by (run id, sequence number, kind).
_page_texts: OrderedDict[tuple, str] = OrderedDict()
PAGE_TEXTS_KEPT = 64


def run_page_text(event: dict) -> str:
    """A `run.event` as its run pages receive it, in JSON. Every page of the run in this
    process is sent the same text, so it is encoded once per event rather than once per
    page (an event may carry 200 results). A sequence number names one event of its run."""
    key = (event["run_id"], event["seq"], event["kind"])
    text = _page_texts.get(key)
    if text is None:
        page_event = {k: v for k, v in event.items() if k != "type"} | {"type": event["kind"]}
        text = _page_texts[key] = json.dumps(page_event)
        if len(_page_texts) > PAGE_TEXTS_KEPT:
            _page_texts.popitem(last=False)
    return text
