"""WebSocket consumers: authorize in connect(), join groups, send a snapshot, then deltas.

Each consumer joins its groups before it reads its snapshot, so an event is either in the
snapshot or arrives after it; pages drop what the snapshot already holds (by sequence
number for run events, by version for queue broadcasts).
"""

from __future__ import annotations

from channels.db import database_sync_to_async

from testruns.live import wire
from testruns.live.delivery import LiveConsumer, run_page_text
from testruns.live.snapshots import dashboard_state, queue_view, run_snapshot
from testruns.models import TestRun
from testruns.reporting.access import get_run_for_user, runs_visible_to, visible_running_ids

CLOSE_FORBIDDEN = 4403


class RunConsumer(LiveConsumer):
    """One run's page: its events, and while it waits, its place in the queue."""

    group: str | None = None
    in_queue_group = False
    queue_version = 0
    queue_seen: dict | None = None

    async def connect(self) -> None:
        # Accept first so that a refusal reaches the page as close code 4403 (a refused
        # handshake is only an HTTP 403 the page cannot tell from a network error).
        await self.accept()
        self.run = await database_sync_to_async(get_run_for_user)(
            self.scope["user"], self.scope["url_route"]["kwargs"]["run_id"]
        )
        if self.run is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        # Join before reading the snapshot, so no event can fall between the two.
        self.group = wire.run_group(self.run.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        if self.run.status == TestRun.Status.QUEUED:
            await self.join_queue_group()
        await self.send_snapshot()

    async def disconnect(self, code) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)
        await self.leave_queue_group()

    async def receive_json(self, content, **kwargs) -> None:
        if content.get("type") == "resync" and self.group:
            await self.send_snapshot()

    async def send_snapshot(self) -> None:
        snapshot = await database_sync_to_async(run_snapshot)(self.run)
        if snapshot["queue"]:
            self.queue_version = max(self.queue_version, snapshot["queue"]["version"])
            self.queue_seen = {
                key: snapshot["queue"][key] for key in ("position", "waiting", "slots")
            }
        elif self.in_queue_group:
            await self.leave_queue_group()
        await self.send_json(snapshot)

    async def run_event(self, event) -> None:
        if event["data"]["run"]["status"] != TestRun.Status.QUEUED:
            await self.leave_queue_group()
        await self.send(text_data=run_page_text(event))

    async def queue_changed(self, event) -> None:
        """Derive this run's place from the one broadcast every waiting page receives."""
        if not self.in_queue_group or event["version"] <= self.queue_version:
            return  # an older broadcast overtaken by a newer one (or by the snapshot)
        self.queue_version = event["version"]
        view = queue_view(event, self.run.pk)
        seen = {key: view[key] for key in ("position", "waiting", "slots")}
        if seen != self.queue_seen:  # the queue changed, but not for this page
            self.queue_seen = seen
            await self.send_json({"type": "queue", **view})

    async def join_queue_group(self) -> None:
        await self.channel_layer.group_add(wire.QUEUE_GROUP, self.channel_name)
        self.in_queue_group = True

    async def leave_queue_group(self) -> None:
        if self.in_queue_group:
            self.in_queue_group = False
            await self.channel_layer.group_discard(wire.QUEUE_GROUP, self.channel_name)


class DashboardConsumer(LiveConsumer):
    """The dashboard: queue broadcasts as they are, and the progress (never the results) of
    the running runs this user may see."""

    queue_version = 0

    async def connect(self) -> None:
        await self.accept()
        self.user = self.scope["user"]
        if not self.user.is_authenticated:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.watching: set[int] = set()
        await self.channel_layer.group_add(wire.QUEUE_GROUP, self.channel_name)
        await self.watch(await database_sync_to_async(visible_running_ids)(self.user))
        await self.send_snapshot()

    async def disconnect(self, code) -> None:
        if not hasattr(self, "watching"):
            return  # refused in connect()
        await self.channel_layer.group_discard(wire.QUEUE_GROUP, self.channel_name)
        for run_id in list(self.watching):
            await self.channel_layer.group_discard(wire.run_group(run_id), self.channel_name)

    async def receive_json(self, content, **kwargs) -> None:
        if content.get("type") == "resync":
            await self.send_snapshot()

    async def send_snapshot(self) -> None:
        state = await database_sync_to_async(dashboard_for)(self.user)
        self.queue_version = max(self.queue_version, state["version"])
        await self.send_json(state)

    async def watch(self, run_ids: set[int]) -> None:
        for run_id in run_ids - self.watching:
            await self.channel_layer.group_add(wire.run_group(run_id), self.channel_name)
        self.watching |= run_ids

    async def queue_changed(self, event) -> None:
        if event["version"] <= self.queue_version:
            return
        self.queue_version = event["version"]
        new = set(event["running"]) - self.watching
        if new:
            await self.watch(
                await database_sync_to_async(visible_running_ids)(self.user, sorted(new))
            )
        await self.send_json(
            {
                "type": "queue",
                "version": event["version"],
                "waiting": event["waiting"],
                "running": event["running"],
                "slots": event["slots"],
            }
        )

    async def run_event(self, event) -> None:
        run = event["data"]["run"]
        if run["status"] in TestRun.FINISHED and event["run_id"] in self.watching:
            self.watching.discard(event["run_id"])
            await self.channel_layer.group_discard(
                wire.run_group(event["run_id"]), self.channel_name
            )
        await self.send_json(
            {"type": "run", "run_id": event["run_id"], "seq": event["seq"], "run": run}
        )


def dashboard_for(user) -> dict:
    """The dashboard snapshot of the runs this user may see (checking permissions reads the
    database, so it runs in a thread with the snapshot)."""
    return dashboard_state(runs_visible_to(user))
