"""End to end across processes: a run launched here is executed by a real Dramatiq worker
process, whose progress reaches a real WebSocket client through the ASGI server and Redis."""

from __future__ import annotations

import json

import pytest
from websockets.sync.client import connect

from testruns.models import TestResult, TestRun
from testruns.services import launch_run

pytestmark = pytest.mark.django_db(transaction=True)


def receive_until(ws, predicate, *, timeout: float = 30.0) -> list[dict]:
    """Collect messages until one satisfies `predicate` (each recv has its own deadline)."""
    messages = []
    while True:
        message = json.loads(ws.recv(timeout=timeout))
        messages.append(message)
        if predicate(message):
            return messages


def test_worker_progress_reaches_websocket_client(
    asgi_server, worker_factory, make_card, simulator, launcher, session_cookie
):
    card = make_card(cases=4)
    run = launch_run(card=card, provider=simulator, user=launcher)

    with connect(f"ws://{asgi_server}/ws/runs/{run.pk}/",
                 additional_headers={"Cookie": session_cookie,
                                     "Origin": f"http://{asgi_server}"}) as ws:
        snapshot = json.loads(ws.recv(timeout=10))
        assert snapshot["type"] == "snapshot"
        # A slot was free, so the run was admitted at launch; no worker has taken a case yet.
        assert snapshot["run"]["status"] == "running"
        assert snapshot["run"]["done_count"] == 0

        # The worker starts only now, so everything it does arrives as live events.
        worker_factory(processes=1, threads=2)
        events = receive_until(
            ws, lambda m: m["data"]["run"]["status"] == "succeeded")

    seqs = [event["seq"] for event in events]
    assert seqs == list(range(snapshot["seq"] + 1, snapshot["seq"] + 1 + len(events)))
    # Progress may be coalesced, but every result arrives exactly once, and counts only grow.
    done = [event["data"]["run"]["done_count"] for event in events]
    assert done == sorted(done) and done[-1] == 4
    rows = [row for event in events for row in event["data"]["results"]]
    assert sorted(row["case_name"] for row in rows) == [f"case {i}" for i in range(4)]
    assert all(row["output"].startswith("[simulated]") for row in rows)

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

    with connect(f"ws://{asgi_server}/ws/runs/{run.pk}/",
                 additional_headers={"Cookie": cookie, "Origin": f"http://{asgi_server}"}) as ws:
        with pytest.raises(Exception) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 4403


def test_websocket_from_a_foreign_origin_is_rejected(asgi_server, session_cookie):
    with pytest.raises(Exception) as rejected:
        connect(f"ws://{asgi_server}/ws/runs/1/",
                additional_headers={"Cookie": session_cookie, "Origin": "http://evil.example"})
    assert "403" in str(rejected.value)
