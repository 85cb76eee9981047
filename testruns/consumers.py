"""WebSocket consumers: authorize, join the run's group, send a snapshot, then deltas."""

from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from testruns import events
from testruns.selectors import get_run_for_user, run_snapshot

CLOSE_FORBIDDEN = 4403


class RunConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        await self.accept()
        self.run = await database_sync_to_async(get_run_for_user)(
            self.scope["user"], self.scope["url_route"]["kwargs"]["run_id"]
        )
        if self.run is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        # Join before reading the snapshot, so no event can fall between the two.
        self.group = events.run_group(self.run.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.send_snapshot()

    async def disconnect(self, code):
        if getattr(self, "group", None):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        if content.get("type") == "resync" and getattr(self, "group", None):
            await self.send_snapshot()

    async def send_snapshot(self):
        await self.send_json(await database_sync_to_async(run_snapshot)(self.run))

    async def run_event(self, event):
        await self.send_json({key: value for key, value in event.items() if key != "type"}
                             | {"type": event["kind"]})
