"""Benchmarks of the live pages' realtime path. One run prints one table.

    .venv/bin/python -m project.stack exec -- .venv/bin/python bench/realtime_bench.py

against throwaway PostgreSQL and Redis, with real daphne processes serving the WebSockets
and the pages played by WebSocket clients in separate processes (hundreds of Chromium tabs
do not fit on a small machine; what a page does on a message is parse JSON and compare
numbers).

By default it runs twice, once per channel layer (`BENCH_LAYERS=pubsub,list`: the pub/sub
layer, the default, then channels_redis' list layer, `CHANNEL_LAYER=list`), and prints both
side by side, each figure beside the other layer's from the same run.

0. reference: raw Redis PUBLISH to one subscriber in another process, as many messages of an
   event's size at the same rate as part 1: what Redis and this machine's scheduling give
   at this moment, with no web process in the way.
1. event latency: 200 pages on one web process watch one run; this process commits run
   events the way a worker does (a result and `publish.announce` in one transaction,
   published after commit through a Dramatiq AsyncIO event-loop thread, as in a worker
   process), 10 per second. Latency is from the commit to each page receiving the event:
   p50 / p99 over every (event, page) pair, and the p50 of the first and the last tenth of
   the events side by side (a backlog shows as the last tenth slower).
2. the same with 1,000 pages across two web processes (500 each, each half played by its
   own client process).
3. queue positions: 500 runs wait behind a full run slot, each with its page open. A slot
   frees (the running run is cancelled); the time until every waiting page has received its
   new position, from the commit that freed the slot.

`BENCH_ONLY=redis_reference|event_latency|wide_event_latency|queue_positions` runs one part;
`BENCH_PAGES`, `BENCH_WIDE_PAGES`, `BENCH_EVENTS`, `BENCH_EVENT_RATE`, `BENCH_WAITING` and
`BENCH_SLOT_FREES` change the sizes. Parts 1 and 2 also print the CPU time each page message
cost the web processes and the clients, and the load average after them: everything here
shares this machine's cores with whatever else runs on it.

Not a test: it asserts nothing. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import base64
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

import psutil  # noqa: E402
import redis  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY  # noqa: E402
from django.contrib.auth.models import Permission, User  # noqa: E402
from django.contrib.sessions.backends.db import SessionStore  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.db.models import F  # noqa: E402
from dramatiq.asyncio import EventLoopThread, set_event_loop_thread  # noqa: E402

from project.embedded import die_with_parent, free_port, port_is_open  # noqa: E402
from testruns.catalog import cards  # noqa: E402
from testruns.engine import gate, launching, limits  # noqa: E402
from testruns.live import publish  # noqa: E402
from testruns.live.snapshots import queue_state  # noqa: E402
from testruns.models import PromptCard, Provider, TestCase, TestResult, TestRun  # noqa: E402

PAGES = int(os.environ.get("BENCH_PAGES", "200"))
# Pages across the two web processes of part 2.
WIDE_PAGES = int(os.environ.get("BENCH_WIDE_PAGES", "1000"))
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


# --- Pages: WebSocket clients in their own processes ----------------------------------------


def pages_process(
    host: str, cookie: str, paths: list[str], mode: str, rounds: int, out: multiprocessing.Queue
) -> None:
    asyncio.run(_pages(host, cookie, paths, mode, rounds, out))


async def _pages(host, cookie, paths, mode, rounds, out) -> None:
    loop = asyncio.get_running_loop()
    address, port = host.split(":")
    pages = []
    for path in paths:  # connect one by one: a page load is not a thundering herd
        page = Page(mode, rounds)
        await loop.create_connection(lambda page=page: page, address, int(port))
        page.open(host, path, cookie)
        await asyncio.wait_for(page.snapshot, 60)
        pages.append(page)
    snapshots = [page.snapshot.result() for page in pages]
    out.put(("ready", [s.get("queue") and s["queue"]["position"] for s in snapshots]))
    cpu = time.process_time()
    await asyncio.gather(*(page.done for page in pages))
    out.put(("done", [page.arrivals for page in pages], time.process_time() - cpu))
    for page in pages:
        page.close()


class Page(asyncio.Protocol):
    """One page: a WebSocket client that reads the server's frames itself and parses each
    message's JSON, as a browser tab does. The websockets library cost about 25 µs of this
    machine's CPU per message, half of what the web process spends on it; a browser costs
    the server's machine nothing, so the pages here should cost it as little as they can.

    mode "events": arrival times of numbered run events after the snapshot, by sequence
    number, until `rounds` of them. mode "positions": arrival time and value of each new
    queue place (0 once the run has started), until `rounds` of them."""

    def __init__(self, mode: str, rounds: int) -> None:
        loop = asyncio.get_running_loop()
        self.mode, self.rounds = mode, rounds
        self.snapshot: asyncio.Future = loop.create_future()
        self.done: asyncio.Future = loop.create_future()
        self.arrivals: dict | list = {} if mode == "events" else []
        self.buffer = bytearray()
        self.fragments: list[bytes] = []
        self.upgraded = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        for future in (self.snapshot, self.done):
            if not future.done():
                future.set_exception(ConnectionError(f"the server closed the page ({exc})"))

    def open(self, host: str, path: str, cookie: str) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: http://{host}\r\nCookie: {cookie}\r\n\r\n".encode()
        )

    def close(self) -> None:
        self.send_frame(0x8, (1000).to_bytes(2, "big"))
        self.transport.close()

    def send_frame(self, opcode: int, payload: bytes) -> None:
        """A masked frame, as a client must send (pongs and the close, all short)."""
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buffer.startswith(b"HTTP/1.1 101"):
                self.snapshot.set_exception(RuntimeError(bytes(self.buffer[:end]).decode()))
                return
            del self.buffer[: end + 4]
            self.upgraded = True
        self.read_frames()

    def read_frames(self) -> None:
        buffer = self.buffer
        while len(buffer) >= 2:
            final, opcode, length, start = buffer[0] & 0x80, buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if length == 126:
                length, start = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                length, start = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < start + length:
                return
            payload = bytes(buffer[start : start + length])
            del buffer[: start + length]
            if opcode == 0x9:
                self.send_frame(0xA, payload)  # ping: pong
            elif opcode in (0x0, 0x1):
                self.fragments.append(payload)
                if final:
                    self.on_message(json.loads(b"".join(self.fragments)))
                    self.fragments.clear()

    def on_message(self, message: dict) -> None:
        if not self.snapshot.done():
            if message["type"] == "snapshot":
                self.snapshot.set_result(message)
            return
        if self.done.done():
            return
        now = time.monotonic()
        if self.mode == "events":
            if message["type"] in ("progress", "status") and (
                message["seq"] > self.snapshot.result()["seq"]
            ):
                self.arrivals[message["seq"]] = now
        elif message["type"] == "queue" and message["position"] is not None:
            self.arrivals.append((now, message["position"]))
        elif message["type"] == "status" and message["data"]["run"]["status"] != "queued":
            self.arrivals.append((now, 0))
            self.arrivals.extend([(None, 0)] * (self.rounds - len(self.arrivals)))
        if len(self.arrivals) >= self.rounds:
            self.done.set_result(None)


def start_pages(host, cookie, paths, mode, rounds):
    """A client process playing one page per path on `host` (call wait_ready next)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=pages_process, args=(host, cookie, paths, mode, rounds, queue), daemon=True
    )
    process.start()
    return process, queue


def wait_ready(clients) -> list:
    """Wait until every page of every client has its snapshot; their queue places, if any."""
    positions = []
    for _, queue in clients:
        kind, page_positions = queue.get(timeout=300)
        assert kind == "ready"
        positions.extend(page_positions)
    return positions


def collect(clients) -> tuple[list, float]:
    """What each page of every client saw, in the order of their paths, and the CPU seconds
    the clients spent from ready to done."""
    arrivals, cpu = [], 0.0
    for process, queue in clients:
        kind, page_arrivals, client_cpu = queue.get(timeout=300)
        assert kind == "done"
        arrivals.extend(page_arrivals)
        cpu += client_cpu
        process.join(timeout=30)
    return arrivals, cpu


def cpu_seconds(servers) -> float:
    """User and system CPU time the web processes have used so far."""
    return sum(sum(psutil.Process(server.pid).cpu_times()[:2]) for server, _ in servers)


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


def start_daphnes(count: int) -> list[tuple[subprocess.Popen, str]]:
    servers = []
    try:
        for _ in range(count):
            servers.append(start_daphne())
    except BaseException:
        stop_daphnes(servers)
        raise
    return servers


def stop_daphnes(servers) -> None:
    for server, _ in servers:
        server.terminate()
    for server, _ in servers:
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:  # one stuck in shutdown must not hang the bench
            server.kill()
            server.wait()


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


# --- 0. Reference: Redis alone ---------------------------------------------------------------


def subscriber_process(url: str, channel: str, count: int, out: multiprocessing.Queue) -> None:
    pubsub = redis.Redis.from_url(url).pubsub()
    pubsub.subscribe(channel)
    pubsub.get_message(timeout=10)  # the confirmation: from here on PUBLISH reaches us
    out.put("ready")
    arrivals: dict[int, float] = {}
    deadline = time.monotonic() + 120
    while len(arrivals) < count and time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if message is not None:
            arrivals[int(message["data"][:8])] = time.monotonic()
    out.put(arrivals)


def bench_redis_reference(servers, cookie, provider, user) -> None:
    """PUBLISH to a subscriber in another process, as many messages at the same rate as the
    events below, each the size of one: the floor under commit -> page on this machine now."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    channel = f"bench.raw.{time.monotonic_ns()}"
    process = context.Process(
        target=subscriber_process, args=(settings.REDIS_URL, channel, EVENTS, queue), daemon=True
    )
    process.start()
    assert queue.get(timeout=120) == "ready"
    client = redis.Redis.from_url(settings.REDIS_URL)
    filler = b"x" * 1000  # about an event with one result
    published = {}
    for i in range(EVENTS):
        published[i] = time.monotonic()
        client.publish(channel, b"%08d" % i + filler)
        time.sleep(max(0.0, 1 / EVENTS_PER_SECOND - (time.monotonic() - published[i])))
    arrivals = queue.get(timeout=120)
    process.join(timeout=30)
    latencies = [(arrivals[i] - published[i]) * 1000 for i in arrivals]
    report(
        "reference: Redis PUBLISH -> subscriber, p50 / p99",
        f"{percentile(latencies, 0.5):.2f} / {percentile(latencies, 0.99):.2f} ms",
    )


# --- 1, 2. Event latency ----------------------------------------------------------------------


def bench_event_latency(servers, cookie, provider, user) -> None:
    watch_one_run(servers[:1], PAGES, f"{PAGES} pages, 1 web process", cookie, provider, user)


def bench_wide_event_latency(servers, cookie, provider, user) -> None:
    label = f"{WIDE_PAGES:,} pages, {len(servers)} web processes"
    watch_one_run(servers, WIDE_PAGES, label, cookie, provider, user)


def watch_one_run(servers, pages, label, cookie, provider, user) -> None:
    """`pages` pages, split evenly between the web processes `servers`, watch one run while
    events are committed at EVENTS_PER_SECOND; latency from each commit to each page, and
    the CPU time each page message cost the web processes and the clients."""
    run = launching.launch_run(card=make_card(EVENTS), provider=provider, user=user)
    path = f"/ws/runs/{run.pk}/"
    shares = [pages // len(servers) + (i < pages % len(servers)) for i in range(len(servers))]
    clients = [
        start_pages(host, cookie, [path] * share, "events", EVENTS)
        for (_, host), share in zip(servers, shares, strict=True)
    ]
    wait_ready(clients)
    web_cpu = cpu_seconds(servers)
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
    arrivals, client_cpu = collect(clients)
    web_cpu = cpu_seconds(servers) - web_cpu
    latencies = [(at - committed[seq]) * 1000 for page in arrivals for seq, at in page.items()]
    last_page = [max(page[seq] for page in arrivals) - committed[seq] for seq in committed]
    # A backlog shows as later events arriving later than early ones.
    tenth = max(1, len(committed) // 10)
    order = sorted(committed)
    first = [page[seq] - committed[seq] for seq in order[:tenth] for page in arrivals]
    last = [page[seq] - committed[seq] for seq in order[-tenth:] for page in arrivals]
    report(f"{label}: events", f"{EVENTS} at {EVENTS_PER_SECOND:.0f}/s, {len(latencies)} arrivals")
    report(f"{label}: commit -> page, p50", f"{percentile(latencies, 0.5):.1f} ms")
    report(f"{label}: commit -> page, p99", f"{percentile(latencies, 0.99):.1f} ms")
    report(
        f"{label}: commit -> last of the pages, p50",
        f"{statistics.median(last_page) * 1000:.1f} ms",
    )
    report(
        f"{label}: first / last tenth of the events, p50",
        f"{statistics.median(first) * 1000:.1f} / {statistics.median(last) * 1000:.1f} ms",
    )
    # Everything here shares the machine's cores with whatever else runs on it.
    report(f"{label}: load average (1 min) after", f"{os.getloadavg()[0]:.1f}")
    report(
        f"{label}: CPU per page message, web / client",
        f"{web_cpu / len(latencies) * 1e6:.0f} / {client_cpu / len(latencies) * 1e6:.0f} µs",
    )
    launching.cancel_run(run)  # give its run slot back


# --- 3. Queue positions ---------------------------------------------------------------------


def bench_queue_positions(servers, cookie, provider, user) -> None:
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
    clients = [start_pages(servers[0][1], cookie, paths, "positions", SLOT_FREES)]
    first = wait_ready(clients)
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
    arrivals, _ = collect(clients)
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
    report(
        "every waiting page shows its new place, median / worst",
        f"{statistics.median(spans):.0f} / {max(spans):.0f} ms",
    )
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
        print(done.stdout[-6000:], done.stderr[-2000:] if done.returncode else "", flush=True)
        rows = [line.split("|")[1:3] for line in done.stdout.splitlines() if line.count("|") == 3]
        tables[layer] = {name.strip(): value.strip() for name, value in rows[2:]}
    names = list(dict.fromkeys(name for table in tables.values() for name in table))
    print("\n| measure | " + " | ".join(f"`{layer}` layer" for layer in layers) + " |")
    print("|---|" + "---|" * len(layers))
    for name in names:
        values = " | ".join(tables[layer].get(name, "") for layer in layers)
        print(f"| {name} | {values} |")


BENCHES = (
    bench_redis_reference,
    bench_event_latency,
    bench_wide_event_latency,
    bench_queue_positions,
)


def main() -> None:
    layers = [layer for layer in os.environ.get("BENCH_LAYERS", "pubsub,list").split(",") if layer]
    if layers:
        compare_layers(layers)
        return
    only = os.environ.get("BENCH_ONLY", "")  # redis_reference, event_latency, ...
    benches = [bench for bench in BENCHES if not only or bench.__name__ == f"bench_{only}"]
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
    servers = []
    try:
        servers = start_daphnes(2 if bench_wide_event_latency in benches else 1)
        print(
            f"PostgreSQL {connection.pg_version / 10000:.0f}, {os.cpu_count()} CPUs; "
            f"{len(servers)} daphne process(es); {settings.CHANNEL_LAYERS['default']['BACKEND']}",
            flush=True,
        )
        for bench in benches:
            print(f"{bench.__name__}...", flush=True)
            bench(servers, cookie, provider, user)
    finally:
        loop_thread.stop()
        stop_daphnes(servers)
    width = max(len(name) for name, _ in ROWS)
    print("\n| measure | value |\n|---|---|")
    for name, value in ROWS:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
