"""End to end across processes: a run launched here is executed by a real Dramatiq worker
process, whose progress reaches a real WebSocket client through the ASGI server and Redis."""

from __future__ import annotations

import json

import pytest
from websockets.sync.client import connect

from testruns.engine.launching import launch_run
from testruns.models import TestResult, TestRun

pytestmark = pytest.mark.django_db(transaction=True)


class RunPage:
    """What the run page's script does: apply a snapshot, then deltas in sequence order;
    drop what it already has, and ask for a new snapshot on a gap (events published from
    different worker threads can overtake each other)."""

    def __init__(self, ws):
        self.ws, self.seq, self.run, self.rows, self.resyncs = ws, -1, {}, {}, 0
        self.delta_rows: list[int] = []

    def apply(self, message: dict) -> None:
        if message["type"] == "snapshot":
            self.seq, self.run = message["seq"], message["run"]
            self.rows.update({row["id"]: row for row in message["results"]})
            return
        if message["seq"] <= self.seq:
            return
        if message["seq"] > self.seq + 1:
            self.resyncs += 1
            self.ws.send(json.dumps({"type": "resync"}))
            return
        self.seq, self.run = message["seq"], message["data"]["run"]
        for row in message["data"]["results"]:
            self.delta_rows.append(row["id"])
            self.rows[row["id"]] = row

    def follow_until(self, status: str, *, timeout: float = 30.0) -> None:
        while self.run.get("status") != status:
            self.apply(json.loads(self.ws.recv(timeout=timeout)))


def test_worker_progress_reaches_websocket_client(
    asgi_server, worker_factory, make_card, simulator, launcher, session_cookie
):
    card = make_card(cases=4)
    run = launch_run(card=card, provider=simulator, user=launcher)

    with connect(
        f"ws://{asgi_server}/ws/runs/{run.pk}/",
        additional_headers={"Cookie": session_cookie, "Origin": f"http://{asgi_server}"},
    ) as ws:
        page = RunPage(ws)
        snapshot = json.loads(ws.recv(timeout=10))
        assert snapshot["type"] == "snapshot"
        # A slot was free, so the run was admitted at launch; no worker has taken a case yet.
        assert snapshot["run"]["status"] == "running"
        assert snapshot["run"]["done_count"] == 0 and snapshot["results"] == []
        page.apply(snapshot)

        # The worker starts only now, so everything it does arrives as live events.
        worker_factory(processes=1, threads=2)
        page.follow_until("succeeded")

    assert page.run["done_count"] == 4 and page.run["passed_count"] == 4
    assert sorted(row["case_name"] for row in page.rows.values()) == [f"case {i}" for i in range(4)]
    assert all(row["output"].startswith("[simulated]") for row in page.rows.values())
    # No result was announced twice; a resync may have re-sent some in a snapshot.
    assert len(page.delta_rows) == len(set(page.delta_rows))
    run.refresh_from_db()
    assert run.status == TestRun.Status.SUCCEEDED
    assert run.results.filter(status=TestResult.Status.PASSED).count() == 4


def test_websocket_refuses_a_run_the_user_may_not_see(
    asgi_server, make_card, simulator, django_user_model, client
):
    owner = django_user_model.objects.create_user("owner", password="pw-owner-123")
    run = launch_run(card=make_card(), provider=simulator, user=owner)
    stranger = django_user_model.objects.create_user("stranger", password="pw-stranger-123")
    client.force_login(stranger)
    cookie = f"sessionid={client.cookies['sessionid'].value}"

    with connect(
        f"ws://{asgi_server}/ws/runs/{run.pk}/",
        additional_headers={"Cookie": cookie, "Origin": f"http://{asgi_server}"},
    ) as ws:
        with pytest.raises(Exception) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 4403


def test_websocket_from_a_foreign_origin_is_rejected(asgi_server, session_cookie):
    with pytest.raises(Exception) as rejected:
        connect(
            f"ws://{asgi_server}/ws/runs/1/",
            additional_headers={"Cookie": session_cookie, "Origin": "http://evil.example"},
        )
    assert "403" in str(rejected.value)


def test_an_idle_websocket_outlives_the_redis_read_timeout(
    asgi_server, make_card, simulator, launcher, session_cookie
):
    """channels_redis blocks 5 s per read of the channel layer; redis-py 8's default socket
    timeout is also 5 s, which used to kill every consumer left idle that long."""
    run = launch_run(card=make_card(), provider=simulator, user=launcher)
    with connect(
        f"ws://{asgi_server}/ws/runs/{run.pk}/",
        additional_headers={"Cookie": session_cookie, "Origin": f"http://{asgi_server}"},
    ) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "snapshot"
        with pytest.raises(TimeoutError):
            ws.recv(timeout=8)  # nothing happens for longer than the old 5 s limit...
        ws.send(json.dumps({"type": "resync"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "snapshot"  # ...and it still works
