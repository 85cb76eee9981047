"""The channel layer behind CHANNEL_LAYER=pubsub: channels_redis' Redis pub/sub layer, with
each group message decoded once per web process instead of once per page.

channels_redis' `RedisPubSubChannelLayer` already subscribes a web process once to a group,
however many of its consumers joined it, and fans a message out in memory; but it queues the
raw bytes for every member, and each consumer decodes its own copy. With 500 waiting pages
one queue broadcast (500 [id, priority] pairs) became 250,000 new lists at once, and the
collector's full passes over the web process's heap that the burst set off (1-2 of about
250 ms each on a 2-core machine) were most of the 540 ms a slot-free took to reach every
page. Here a group message is decoded when it arrives and the same dict is queued for every
member, so the work per event is one decode per process whatever the number of pages.

Consumers must only read the messages they are given (ours do): all of a process's members
of a group share one dict. Messages to a single channel are decoded as before.

Built on channels_redis 4.3's loop layer and shard connection (requirements.txt pins it);
tests/test_fanout.py checks that group members still get one shared, decoded message.
"""

from __future__ import annotations

import asyncio

from channels_redis import pubsub
from channels_redis.utils import _wrap_close


class PubSubChannelLayer(pubsub.RedisPubSubChannelLayer):
    def deserialize(self, message: bytes | dict) -> dict:
        # Group messages are already decoded (see _Shard); those to one channel are bytes.
        if isinstance(message, dict):
            return message
        return super().deserialize(message)

    def _get_layer(self):
        # As RedisPubSubChannelLayer._get_layer (one layer per event loop), but ours.
        loop = asyncio.get_running_loop()
        layer = self._layers.get(loop)
        if layer is None:
            layer = self._layers[loop] = _LoopLayer(*self._args, **self._kwargs, channel_layer=self)
            _wrap_close(self, loop)
        return layer


class _LoopLayer(pubsub.RedisPubSubLoopLayer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Shards connect lazily, so swapping them before first use loses nothing.
        self._shards = [_Shard(shard.host, self) for shard in self._shards]


class _Shard(pubsub.RedisSingleShardConnection):
    def _receive_message(self, message) -> None:
        if message is None:
            return
        name = message["channel"]
        if isinstance(name, bytes):
            name = name.decode()
        layer = self.channel_layer
        members = layer.groups.get(name)
        if not members or name in layer.channels:
            super()._receive_message(message)
            return
        decoded = layer.channel_layer.deserialize(message["data"])
        for channel in members:
            queue = layer.channels.get(channel)
            if queue is not None:
                queue.put_nowait(decoded)
