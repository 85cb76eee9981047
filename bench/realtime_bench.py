"""Benchmarks of the live pages' realtime path. One run prints one table.

    .venv/bin/python -m project.stack exec -- .venv/bin/python bench/realtime_bench.py

against throwaway PostgreSQL and Redis, with a real daphne serving the WebSockets and the
pages played by WebSocket clients in a separate process (200 or 500 Chromium tabs do not fit
on a small machine; what a page does on a message is parse JSON and compare numbers).

By default it runs twice, once per channel layer (`BENCH_LAYERS=list,pubsub`: channels_redis'
list layer, the default, then the pub/sub layer, `CHANNEL_LAYER=pubsub`), and prints both side
by side.

1. event latency: 200 pages watch one run; this process commits run events the way a worker
   does (a result and `publish.announce` in one transaction, published after commit through a
   Dramatiq AsyncIO event-loop thread, as in a worker process). Latency is from the commit to
   each page receiving the event: p50 / p99 over every (event, page) pair.
2. queue positions: 500 runs wait behind a full run slot, each with its page open. A slot
   frees (the running run is cancelled); the time until every waiting page has received its
   new position, from the commit that freed the slot.

Not a test: it asserts nothing. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("LOG_LEVEL", "WARNING")
os.environ.setdefault("DEBUG", "0")
os.environ.setdefault("SECRET_KEY", "bench-only-" + "x" * 50)
os.environ.setdefault("ALLOWED_HOSTS", "127.0.0.1")
os.environ.setdefault("SECURE_SSL_REDIRECT", "0")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY  # noqa: E402
from django.contrib.auth.models import Permission, User  # noqa: E402
from django.contrib.sessions.backends.db import SessionStore  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.db.models import F  # noqa: E402
from dramatiq.asyncio import EventLoopThread, set_event_loop_thread
from websockets.asyncio.client import connect

from project.embedded import die_with_parent, free_port, port_is_open  # noqa: E402
from testruns.catalog import cards  # noqa: E402
from testruns.engine import gate, launching, limits  # noqa: E402
from testruns.live import publish  # noqa: E402
from testruns.live.snapshots import queue_state  # noqa: E402
from testruns.models import PromptCard, Provider, TestCase, TestResult, TestRun  # noqa: E402

PAGES = int(os.environ.get("BENCH_PAGES", "200"))
EVENTS = int(os.environ.get("BENCH_EVENTS", "100"))
EVENTS_PER_SECOND = float(os.environ.get("BENCH_EVENT_RATE", "10"))
WAITING = int(os.environ.get("BENCH_WAITING", "500"))
SLOT_FREES = int(os.environ.get("BENCH_SLOT_FREES", "5"))
ROWS: list[tuple[str, str]] = []


def report(name: str, value: str) -> None:
    ROWS.append((name, value))
    print(f"  {name}: {value}", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- Pages: WebSocket clients in their own process ------------------------------------------


def pages_process(
    host: str, cookie: str, paths: list[str], mode: str, rounds: int, out: multiprocessing.Queue
) -> None:
    asyncio.run(_pages(host, cookie, paths, mode, rounds, out))


async def _pages(host, cookie, paths, mode, rounds, out) -> None:

    headers = {"Cookie": cookie, "Origin": f"http://{host}"}
    sockets = []
    for path in paths:  # connect one by one: a page load is not a thundering herd
        sockets.append(
            await connect(
                f"ws://{host}{path}", additional_headers=headers, max_size=2**24, open_timeout=60
            )
        )
    snapshots = [json.loads(await ws.recv()) for ws in sockets]
    out.put(("ready", [s.get("queue") and s["queue"]["position"] for s in snapshots]))

    async def events_of(ws, snapshot):
        """Arrival times of numbered run events, by sequence number."""
        arrivals, seq = {}, snapshot["seq"]
        while len(arrivals) < rounds:
            message = json.loads(await ws.recv())
            if message.get("type") in ("progress", "status") and message["seq"] > seq:
                arrivals[message["seq"]] = time.monotonic()
        return arrivals

    async def positions_of(ws, snapshot):
        """Arrival time of each new queue position (or of the start of the run)."""
        arrivals = []
        while len(arrivals) < rounds:
            message = json.loads(await ws.recv())
            if message.get("type") == "queue" and message["position"] is not None:
                arrivals.append((time.monotonic(), message["position"]))
            elif message.get("type") == "status" and message["data"]["run"]["status"] != "queued":
                arrivals.append((time.monotonic(), 0))
                arrivals.extend([(None, 0)] * (rounds - len(arrivals)))
        return arrivals

    watch = events_of if mode == "events" else positions_of
    results = await asyncio.gather(
        *(watch(ws, s) for ws, s in zip(sockets, snapshots, strict=True))
    )
    out.put(("done", results))
    for ws in sockets:
        await ws.close()


def start_pages(host, cookie, paths, mode, rounds):
    queue = multiprocessing.get_context("spawn").Queue()
    process = multiprocessing.get_context("spawn").Process(
        target=pages_process, args=(host, cookie, paths, mode, rounds, queue), daemon=True
    )
    process.start()
    kind, positions = queue.get(timeout=300)
    assert kind == "ready"
    return process, queue, positions


# --- Setup ----------------------------------------------------------------------------------


def start_daphne() -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
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
        cwd=ROOT,
        env=dict(os.environ),
        preexec_fn=die_with_parent(),
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not port_is_open(port):
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit("daphne did not start")
        time.sleep(0.1)
    return server, f"127.0.0.1:{port}"


def session_cookie_for(user: User) -> str:
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    return f"{settings.SESSION_COOKIE_NAME}={session.session_key}"


def make_card(cases: int) -> PromptCard:
    card = PromptCard.objects.create(
        name="bench", slug=f"bench-{time.monotonic_ns()}", template="bench {{ i }}"
    )
    TestCase.objects.bulk_create(
        TestCase(card=card, name=f"case {i}", variables={"i": i}, assertions=[], order=i)
        for i in range(cases)
    )
    cards.snapshot_version(card)
    return card


def worker_event_loop():
    """Publish as a worker process does: through one Dramatiq AsyncIO event-loop thread."""

    thread = EventLoopThread(logger=logging.getLogger("bench.event_loop"))
    thread.start()
    set_event_loop_thread(thread)
    return thread


# --- 1. Event latency -----------------------------------------------------------------------


def bench_event_latency(host: str, cookie: str, provider: Provider, user: User) -> None:
    run = launching.launch_run(card=make_card(EVENTS), provider=provider, user=user)
    paths = [f"/ws/runs/{run.pk}/"] * PAGES
    process, queue, _ = start_pages(host, cookie, paths, "events", EVENTS)
    committed: dict[int, float] = {}
    results = list(TestResult.objects.filter(run=run).order_by("position"))
    for result in results:
        started = time.monotonic()
        with transaction.atomic():
            TestResult.objects.filter(pk=result.pk).update(
                status="passed", output="ok", latency_ms=1
            )
            TestRun.objects.filter(pk=run.pk).update(
                done_count=F("done_count") + 1, passed_count=F("passed_count") + 1
            )
            seq = TestRun.objects.values_list("event_seq", flat=True).get(pk=run.pk) + 1
            # Registered before announce's own callback, so it runs first, at the commit.
            transaction.on_commit(lambda s=seq: committed.__setitem__(s, time.monotonic()))
            publish.announce(run.pk, kind="progress")
        time.sleep(max(0.0, 1 / EVENTS_PER_SECOND - (time.monotonic() - started)))
    kind, arrivals = queue.get(timeout=300)
    process.join(timeout=30)
    latencies = [(at - committed[seq]) * 1000 for page in arrivals for seq, at in page.items()]
    last_page = [max(page[seq] for page in arrivals) - committed[seq] for seq in committed]
    report("pages watching one run", str(PAGES))
    report("events (a result each)", f"{EVENTS} at {EVENTS_PER_SECOND:.0f}/s")
    report("commit -> page, p50", f"{percentile(latencies, 0.5):.1f} ms")
    report("commit -> page, p99", f"{percentile(latencies, 0.99):.1f} ms")
    report("commit -> last of the pages, p50", f"{statistics.median(last_page) * 1000:.1f} ms")
    # A backlog shows as later events arriving later than early ones.
    tenth = max(1, len(committed) // 10)
    order = sorted(committed)
    first = [page[seq] - committed[seq] for seq in order[:tenth] for page in arrivals]
    last = [page[seq] - committed[seq] for seq in order[-tenth:] for page in arrivals]
    report("first tenth of the events, p50", f"{statistics.median(first) * 1000:.1f} ms")
    report("last tenth of the events, p50", f"{statistics.median(last) * 1000:.1f} ms")
    report("samples (event x page)", str(len(latencies)))
    launching.cancel_run(run)  # give its run slot back


# --- 2. Queue positions ---------------------------------------------------------------------


def bench_queue_positions(host: str, cookie: str, provider: Provider, user: User) -> None:
    limits.set_limit(gate.RUNS, 1)
    card = make_card(1)
    running = [launching.launch_run(card=card, provider=provider, user=user)]
    waiting = [
        launching.launch_run(card=card, provider=provider, user=user) for _ in range(WAITING)
    ]
    assert TestRun.objects.filter(pk__in=[r.pk for r in waiting], status="queued").count() == (
        WAITING
    )
    paths = [f"/ws/runs/{run.pk}/" for run in waiting]
    process, queue, first = start_pages(host, cookie, paths, "positions", SLOT_FREES)
    assert first == list(range(1, WAITING + 1)), "pages start at their places"
    freed_at = []
    for _ in range(SLOT_FREES):
        holder = TestRun.objects.get(status="running")
        with transaction.atomic():
            transaction.on_commit(lambda: freed_at.append(time.monotonic()))
            launching.cancel_run(holder)
        # The next round frees the slot once every page has had time to hear of this one; the
        # pages report their own arrival times, so the pause does not enter the figure.
        time.sleep(2.0)
        running.append(holder)
    kind, arrivals = queue.get(timeout=300)
    process.join(timeout=30)
    spans, correct = [], True
    for round_, freed in enumerate(freed_at):
        times = [page[round_][0] for page in arrivals if page[round_][0] is not None]
        spans.append((max(times) - freed) * 1000)
        for index, page in enumerate(arrivals):
            expected = max(0, index + 1 - (round_ + 1))
            correct &= page[round_][1] == expected
    payload = len(json.dumps(events_queue_message_example()))
    report("runs waiting, each with its page", str(WAITING))
    report("slot frees measured", str(SLOT_FREES))
    report("every waiting page shows its new place, median", f"{statistics.median(spans):.0f} ms")
    report("every waiting page shows its new place, worst", f"{max(spans):.0f} ms")
    report("positions all correct", "yes" if correct else "NO")
    report("queue broadcast size", f"{payload / 1024:.1f} KiB")
    # Leave the queue empty for whatever runs next against the same database.
    for run in TestRun.objects.filter(status__in=["queued", "running"]):
        launching.cancel_run(run)


def events_queue_message_example() -> dict:
    return {"type": "queue.changed", **queue_state()}


def compare_layers(layers: list[str]) -> None:
    """Run the benchmark once per channel layer, each in a process of its own (the layer is a
    setting), and print their figures side by side: the reference and the change measured
    in the same run, minutes apart at most."""
    tables: dict[str, dict[str, str]] = {}
    for layer in layers:
        print(f"\n== CHANNEL_LAYER={layer}", flush=True)
        env = dict(os.environ, CHANNEL_LAYER=layer, BENCH_LAYERS="")
        done = subprocess.run(
            [sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True
        )
        print(done.stdout[-4000:], done.stderr[-2000:] if done.returncode else "", flush=True)
        rows = [line.split("|")[1:3] for line in done.stdout.splitlines() if line.count("|") == 3]
        tables[layer] = {name.strip(): value.strip() for name, value in rows[2:]}
    names = list(dict.fromkeys(name for table in tables.values() for name in table))
    print("\n| measure | " + " | ".join(f"`{layer}` layer" for layer in layers) + " |")
    print("|---|" + "---|" * len(layers))
    for name in names:
        values = " | ".join(tables[layer].get(name, "") for layer in layers)
        print(f"| {name} | {values} |")


def main() -> None:
    layers = [layer for layer in os.environ.get("BENCH_LAYERS", "list,pubsub").split(",") if layer]
    if layers:
        compare_layers(layers)
        return
    call_command("migrate", verbosity=0)
    provider = Provider.objects.create(
        name=f"bench-sim-{time.monotonic_ns()}",
        kind="simulator",
        max_concurrency=4,
        parameters={"latency_ms": 1},
    )
    limits.ensure_semaphores(provider)
    limits.set_limit(gate.RUNS, 1000)
    user = User.objects.create_user(f"bench-{time.monotonic_ns()}", password="x")
    user.user_permissions.add(
        *Permission.objects.filter(
            codename__in=["view_testrun", "launch_testrun", "cancel_testrun"]
        )
    )
    cookie = session_cookie_for(user)
    loop_thread = worker_event_loop()
    server, host = None, None
    try:
        server, host = start_daphne()
        print(
            f"PostgreSQL {connection.pg_version / 10000:.0f}, {os.cpu_count()} CPUs; "
            f"one daphne process",
            flush=True,
        )
        only = os.environ.get("BENCH_ONLY", "")  # event_latency or queue_positions
        for bench in (bench_event_latency, bench_queue_positions):
            if only and only not in bench.__name__:
                continue
            print(f"{bench.__name__}...", flush=True)
            bench(host, cookie, provider, user)
    finally:
        loop_thread.stop()
        if server is not None:
            server.terminate()
            server.wait(timeout=20)
    width = max(len(name) for name, _ in ROWS)
    print("\n| measure | value |\n|---|---|")
    for name, value in ROWS:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
