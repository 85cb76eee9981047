"""Chaos: every launched run ends and every slot comes back while worker processes are
SIGKILLed, Redis and PostgreSQL go away, the vendor answers garbage, and a worker host is cut
off from the network.

Each test starts a world of its own (PostgreSQL, Redis, the fake vendor, daphne and Dramatiq
worker processes) under the Supervisor that `make run` uses, so the faults it injects hurt
no other test. Faults are real: processes are killed with signals, PostgreSQL is stopped
with its own fast shutdown, and a host's link is taken down.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import psycopg
import pytest

from project import embedded
from project.embedded import free_port
from project.supervisor import Supervisor
from tests.conftest import OUTPUT_DIR, ROOT, wait_for

pytestmark = pytest.mark.chaos

FINISHED = ("succeeded", "failed", "error", "cancelled")
DONE = ("passed", "failed", "error", "skipped")


# --- the world ----------------------------------------------------------------------------------


class ChaosWorld:
    """PostgreSQL, Redis, the fake vendor, the web server and workers, all the test's own."""

    def __init__(self, root: Path, *, listen: str = "127.0.0.1", lease_ttl: float = 10.0):
        self.root = root
        self.listen = listen
        self.logs = OUTPUT_DIR / f"chaos-{os.getpid()}-{time.monotonic_ns()}"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.events: list[str] = []
        self.supervisor = Supervisor(max_crashes=30, window=60.0, log=self.note)
        self.stopping = threading.Event()
        self.watcher: threading.Thread | None = None
        self.lease_ttl = lease_ttl
        self.env: dict[str, str] = {}
        self.vendor: subprocess.Popen | None = None
        self.vendor_url = ""
        self.web_port = free_port()

    def note(self, line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        self.events.append(stamped)
        with (self.logs / "events.log").open("a") as handle:
            handle.write(stamped + "\n")

    # services

    def start_services(self) -> None:
        pg_dir, pg_port = self.root / "postgres", free_port()
        pg_password = embedded.prepare_postgres(pg_dir)
        redis_dir, redis_port = self.root / "redis", free_port()
        redis_password = embedded.prepare_redis(redis_dir)
        listen = self.listen
        addresses = ["127.0.0.1"]
        if listen != "127.0.0.1":
            addresses.append(listen)
            hba = pg_dir / "pg_hba.conf"
            with hba.open("a") as handle:  # the other hosts reach it over the bridge
                handle.write(f"host all all {listen}/24 scram-sha-256\n")
        self.supervisor.add(
            "postgres",
            lambda: embedded.spawn_postgres(
                pg_dir, pg_port, durable=False, listen=",".join(addresses)
            ),
            stop_signal=signal.SIGINT,
            group="services",
            ready=lambda: embedded.pg_accepts(pg_port),
        )
        self.supervisor.add(
            "redis",
            lambda: embedded.spawn_redis(
                redis_dir, redis_port, redis_password, durable=False, listen=" ".join(addresses)
            ),
            group="services",
            ready=lambda: embedded.port_is_open(redis_port),
        )
        self.supervisor.start()
        server = embedded.postgres_url(pg_port, pg_password)
        self.local_db = embedded.ensure_database(server, "chaos")
        self.env = {
            **os.environ,
            "DATABASE_URL": self.local_db,
            "REDIS_URL": embedded.redis_url(redis_port, redis_password),
            "LEASE_TTL_SECONDS": str(self.lease_ttl),
            "SWEEP_INTERVAL_SECONDS": "0.5",
            "MAX_CONCURRENT_RUNS": "3",
            "PYTHONUNBUFFERED": "1",
            "DJANGO_SETTINGS_MODULE": "project.settings",
        }
        self.remote_env = {
            "DATABASE_URL": self.local_db.replace("127.0.0.1", listen),
            "REDIS_URL": self.env["REDIS_URL"].replace("127.0.0.1", listen),
        }
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
            env=self.env,
            cwd=ROOT,
            check=True,
        )

    def start_vendor(self, latency: float) -> None:
        self.vendor = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.fake_llm",
                "--host",
                self.listen,
                "--port",
                "0",
                "--latency",
                str(latency),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.vendor_url = self.vendor.stdout.readline().strip()
        assert self.vendor_url.startswith("http://"), self.vendor_url

    def vendor_call(self, path: str, payload: dict | None = None) -> dict:
        data = json.dumps(payload).encode() if payload is not None else None
        root = self.vendor_url.removesuffix("/v1")
        request = urllib.request.Request(
            root + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def launch(self, **options) -> list[int]:
        args = [sys.executable, "-m", "tests.chaos_launch", "--vendor", self.vendor_url]
        for name, value in options.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        done = subprocess.run(
            args, env=self.env, cwd=ROOT, check=True, capture_output=True, text=True
        )
        return json.loads(done.stdout)["runs"]

    # the app

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Callable:
        def start() -> subprocess.Popen:
            with (self.logs / f"{name}.log").open("ab") as log:
                return subprocess.Popen(
                    args,
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=embedded.die_with_parent(signal.SIGKILL),
                )

        return start

    def add_web(self) -> None:
        port = self.web_port
        self.supervisor.add(
            "web",
            self._spawn(
                "web",
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
                self.env,
            ),
            ready=lambda: embedded.port_is_open(port),
        )

    def add_worker(
        self,
        name: str,
        *,
        threads: int = 4,
        wrap: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        command = [
            sys.executable,
            "manage.py",
            "rundramatiq",
            "--processes",
            "1",
            "--threads",
            str(threads),
            "--worker-shutdown-timeout",
            "2000",
        ]
        self.supervisor.add(name, self._spawn(name, (wrap or []) + command, env or self.env))

    def worker_log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def run(self) -> None:
        """Start what was added since, and restart whatever dies from now on."""
        self.supervisor.start()
        if self.watcher is None:
            self.watcher = threading.Thread(
                target=self.supervisor.watch, args=(self.stopping,), name="supervisor", daemon=True
            )
            self.watcher.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.watcher:
            self.watcher.join(10)
        self.supervisor.stop()
        if self.vendor and self.vendor.poll() is None:
            self.vendor.kill()
            self.vendor.wait()

    # reading the database directly: it may be down, and the ORM points at the test database

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.local_db, connect_timeout=3, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()

    def try_query(self, sql: str, params: tuple = ()) -> list[tuple] | None:
        try:
            return self.query(sql, params)
        except psycopg.Error:
            return None

    def unfinished_runs(self, run_ids: list[int]) -> int | None:
        rows = self.try_query(
            "SELECT count(*) FROM testruns_testrun WHERE id = ANY(%s) AND status <> ALL(%s)",
            (run_ids, list(FINISHED)),
        )
        return None if rows is None else rows[0][0]

    def assert_every_run_ended_and_every_slot_came_back(
        self, run_ids: list[int], cases: int
    ) -> None:
        statuses = dict(
            self.query("SELECT id, status FROM testruns_testrun WHERE id = ANY(%s)", (run_ids,))
        )
        assert sorted(statuses) == sorted(run_ids)
        assert set(statuses.values()) <= set(FINISHED), statuses
        per_run = self.query(
            "SELECT run_id, count(*), count(DISTINCT case_id), "
            "count(*) FILTER (WHERE status = ANY(%s)) FROM testruns_testresult "
            "WHERE run_id = ANY(%s) GROUP BY run_id",
            (list(DONE), run_ids),
        )
        assert len(per_run) == len(run_ids)
        for run_id, results, distinct_cases, done in per_run:
            assert (results, distinct_cases, done) == (cases, cases, cases), run_id
        totals = self.query(
            "SELECT id, done_count, total_cases FROM testruns_testrun "
            "WHERE id = ANY(%s) AND done_count <> total_cases",
            (run_ids,),
        )
        assert totals == []
        semaphores = self.query(
            "SELECT s.name, s.in_use, (SELECT count(*) FROM testruns_lease l "
            "WHERE l.semaphore_id = s.id) FROM testruns_semaphore s ORDER BY s.name"
        )
        for name, in_use, leases in semaphores:
            assert in_use == leases == 0, (name, in_use, leases)


@contextmanager
def chaos_world(**kwargs) -> Iterator[ChaosWorld]:
    # Under var/ (as make test's own services), not pytest's tmp_path: PostgreSQL runs as
    # another account, which cannot enter pytest's private temporary folders.
    root = ROOT / "var" / "test" / f"chaos-{os.getpid()}-{time.monotonic_ns()}"
    world = ChaosWorld(root, **kwargs)
    try:
        yield world
    finally:
        world.stop()
        shutil.rmtree(root, ignore_errors=True)


class PeakSampler(threading.Thread):
    """Samples the lease rows while the faults go on (when PostgreSQL answers) and keeps the
    most slots ever held at once per semaphore."""

    def __init__(self, world: ChaosWorld):
        super().__init__(daemon=True, name="peak-sampler")
        self.world = world
        self.peaks: dict[str, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            rows = self.world.try_query(
                "SELECT s.name, count(l.id) FROM testruns_semaphore s "
                "LEFT JOIN testruns_lease l ON l.semaphore_id = s.id GROUP BY s.name"
            )
            for name, held in rows or []:
                self.peaks[name] = max(self.peaks.get(name, 0), held)


# --- faults -------------------------------------------------------------------------------------

# What the vendor answers, in proportion: mostly good answers, and every kind of bad one.
VENDOR_MIX = [
    (50, {}),
    (6, {"raw": "<html><body><h1>502 Bad Gateway</h1></body></html>", "content_type": "text/html"}),
    (5, {"text": "before\u0000after"}),
    (5, {"text": "lone \ud800 surrogate"}),
    (5, {"usage": {"prompt_tokens": -5, "completion_tokens": -7, "total_tokens": -12}}),
    (1, {"size": 50 * 1024 * 1024}),
    (10, {"status": 429, "headers": {"Retry-After": "1"}}),
    (8, {"status": 500}),
    (3, {"hang": True}),
]


def vendor_script(rng: random.Random, length: int) -> list[dict]:
    weights, replies = zip(*VENDOR_MIX, strict=True)
    return rng.choices(replies, weights=weights, k=length)


def dramatiq_worker_processes(world: ChaosWorld, name: str) -> list[psutil.Process]:
    """The processes that run actors: the children of a `rundramatiq` main process."""
    with suppress(LookupError, psutil.Error):
        main = psutil.Process(world.supervisor.process(name).pid)
        return [p for p in main.children() if p.status() != psutil.STATUS_ZOMBIE]
    return []


def test_faults_every_run_ends_with_one_result_per_case_and_every_slot_back():
    """About a minute of: worker processes SIGKILLed every few seconds (the supervisor
    restarts them), Redis killed once, PostgreSQL fast-shut-down once, and a vendor that
    answers a mix of good replies, HTML, NUL and lone-surrogate text, negative token counts,
    a 50 MB body, 429s with Retry-After, 500s and hangs."""
    rng = random.Random(1313)
    with chaos_world() as world:
        world.start_services()
        world.start_vendor(latency=0.6)
        script = vendor_script(rng, 700)
        world.vendor_call("/_control", {"script": script})
        world.add_web()
        workers = [f"workers-{i}" for i in range(1, 4)]
        for name in workers:
            world.add_worker(name)
        world.run()
        run_ids = world.launch(
            runs=20, cases=10, provider_limit=4, run_limit=3, timeout=2, retries=2, per_run=2
        )
        sampler = PeakSampler(world)
        sampler.start()

        started = time.monotonic()
        next_kill = started + rng.uniform(2, 5)
        faults = {20.0: "redis", 35.0: "postgres"}
        kills = 0
        while time.monotonic() - started < 60:
            now = time.monotonic() - started
            for at, service in list(faults.items()):
                if now >= at:
                    del faults[at]
                    process = world.supervisor.process(service)
                    if service == "redis":
                        world.note("chaos: SIGKILL redis")
                        process.kill()
                    else:
                        world.note("chaos: fast shutdown of PostgreSQL (SIGINT)")
                        process.send_signal(signal.SIGINT)
            if time.monotonic() >= next_kill:
                name = rng.choice(workers)
                victims = dramatiq_worker_processes(world, name)
                if victims:
                    victim = rng.choice(victims)
                    world.note(f"chaos: SIGKILL {name}'s worker process {victim.pid}")
                    with suppress(psutil.Error):
                        victim.kill()
                    kills += 1
                next_kill = time.monotonic() + rng.uniform(3, 6)
            time.sleep(0.1)  # the pace of the faults, not a wait for a condition
        world.note(f"chaos over: {kills} worker kills; waiting for the runs to end")

        wait_for(
            lambda: world.unfinished_runs(run_ids) == 0,
            timeout=240,
            interval=0.5,
            what="every run to end after the faults",
        )
        sampler.done.set()
        sampler.join()
        stats = world.vendor_call("/_stats")

        world.assert_every_run_ended_and_every_slot_came_back(run_ids, cases=10)
        assert kills >= 8
        assert sum(world.supervisor.restarts(name) for name in workers) >= 8
        assert world.supervisor.restarts("redis") == 1
        assert world.supervisor.restarts("postgres") == 1
        assert stats["peak_concurrency"] <= 4, stats
        # The script is served in order: by the time the vendor had this many requests, every
        # kind of answer in the mix had been sent at least once.
        every_kind_by = max(script.index(reply) for _, reply in VENDOR_MIX) + 1
        assert stats["request_count"] >= every_kind_by, (stats, every_kind_by)
        provider = next(name for name in sampler.peaks if name.startswith("provider:"))
        assert sampler.peaks[provider] <= 4 and sampler.peaks["runs"] <= 3, sampler.peaks
        errors = dict(
            world.query("SELECT status, count(*) FROM testruns_testresult GROUP BY status")
        )
        world.note(f"results by status: {errors}; vendor: {stats}; peaks: {sampler.peaks}")
        with urllib.request.urlopen(
            f"http://127.0.0.1:{world.web_port}/healthz", timeout=10
        ) as response:
            assert response.status == 200  # the app is still serving, with live workers


# --- hosts --------------------------------------------------------------------------------------

BRIDGE_ADDRESS = "10.231.0.1"


class Hosts:
    """Network namespaces joined by a bridge in the root namespace, which is where
    PostgreSQL, Redis and the vendor listen (on BRIDGE_ADDRESS)."""

    def __init__(self) -> None:
        self.tag = str(os.getpid())
        self.bridge = f"pcrbr{self.tag}"
        self.namespaces: dict[str, str] = {}

    @classmethod
    def remove_stale(cls) -> None:
        """Remove the bridge and namespaces of an earlier run that was killed before it could
        (named after its pid): its bridge would hold BRIDGE_ADDRESS and take our traffic."""
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True)
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        for pid in set(re.findall(r"pcrbr(\d+)", links.stdout)) | set(
            re.findall(r"pcr(\d+)host", namespaces.stdout)
        ):
            if pid != str(os.getpid()) and not psutil.pid_exists(int(pid)):
                subprocess.run(["ip", "link", "del", f"pcrbr{pid}"], capture_output=True)
                for name in re.findall(rf"pcr{pid}host\w*", namespaces.stdout):
                    subprocess.run(["ip", "netns", "del", name], capture_output=True)

    @staticmethod
    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def create(self, names: list[str]) -> None:
        self.ip("link", "add", self.bridge, "type", "bridge")
        self.ip("addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", self.bridge)
        self.ip("link", "set", self.bridge, "up")
        for number, name in enumerate(names, start=2):
            namespace = f"pcr{self.tag}{name}"
            self.ip("netns", "add", namespace)
            self.namespaces[name] = namespace
            self.ip(
                "link",
                "add",
                self.veth(name),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                namespace,
            )
            self.ip("link", "set", self.veth(name), "master", self.bridge, "up")
            self.ip("-n", namespace, "addr", "add", f"10.231.0.{number}/24", "dev", "eth0")
            self.ip("-n", namespace, "link", "set", "eth0", "up")
            self.ip("-n", namespace, "link", "set", "lo", "up")

    def veth(self, name: str) -> str:
        return f"v{self.tag}{name[-1]}"  # at most 15 characters: "v", a pid, a letter

    def cut(self, name: str) -> None:
        self.ip("link", "set", self.veth(name), "down")

    def reconnect(self, name: str) -> None:
        self.ip("link", "set", self.veth(name), "up")

    def wrap(self, name: str) -> list[str]:
        """Run a command on that host: its namespace, and a host name of its own."""
        return [
            "ip",
            "netns",
            "exec",
            self.namespaces[name],
            "unshare",
            "--uts",
            "sh",
            "-c",
            f'hostname {name} && exec "$@"',
            "sh",
        ]

    def remove(self) -> None:
        for name, namespace in self.namespaces.items():
            subprocess.run(["ip", "link", "del", self.veth(name)], capture_output=True)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if shutil.which("ip") is None or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the hosts chaos test needs root and iproute2 in CI")
        pytest.skip("needs root and iproute2 (ip netns)")
    Hosts.remove_stale()
    made = Hosts()
    try:
        made.create(["hosta", "hostb"])
        yield made
    finally:
        made.remove()


def test_hosts_a_cut_off_host_s_cases_run_elsewhere_and_it_writes_nothing_on_return(hosts):
    """Workers on two hosts (network namespaces, PostgreSQL and Redis reached over a veth
    pair); one host loses its link for longer than the lease TTL while it holds cases, and
    comes back after the other host finished everything."""
    ttl = 3.0
    with chaos_world(listen=BRIDGE_ADDRESS, lease_ttl=ttl) as world:
        world.start_services()
        world.start_vendor(latency=1.0)
        for name in ("hosta", "hostb"):
            world.add_worker(
                name, threads=2, wrap=hosts.wrap(name), env=world.env | world.remote_env
            )
        world.run()
        run_ids = world.launch(
            runs=4, cases=8, provider_limit=4, run_limit=4, timeout=5, retries=1, per_run=2
        )
        sampler = PeakSampler(world)
        sampler.start()

        def held_by_a() -> list[int]:
            rows = world.query(
                "SELECT result_id FROM testruns_lease WHERE holder LIKE "
                "'hosta:%%' AND result_id IS NOT NULL"
            )
            return [row[0] for row in rows]

        wait_for(held_by_a, timeout=60, what="host A to hold cases")
        hosts.cut("hosta")
        cut_at = time.monotonic()
        stranded = held_by_a()  # read after the cut: host A can change nothing any more
        assert stranded
        world.note(f"chaos: host A cut off holding results {stranded}")

        wait_for(
            lambda: world.unfinished_runs(run_ids) == 0,
            timeout=120,
            interval=0.5,
            what="host B to finish every run, host A's cases included",
        )
        assert time.monotonic() - cut_at > ttl
        finished = world.query(
            "SELECT id, status, output, finished_at, attempts FROM testruns_testresult ORDER BY id"
        )
        statuses = {row[0]: row[1] for row in finished}
        # Re-run on host B and answered there: the vendor answers every request normally here,
        # so an error would be a case given up rather than run elsewhere.
        assert all(statuses[result] in ("passed", "failed") for result in stranded), statuses

        reconnected = world.query("SELECT now()")[0][0]
        hosts.reconnect("hosta")
        world.note("chaos: host A reconnected")
        # Host A is back once its heartbeat reaches PostgreSQL again; then each thread the
        # cut interrupted finds its lease gone and drops its case.
        wait_for(
            lambda: world.query(
                "SELECT 1 FROM testruns_workerheartbeat WHERE hostname = 'hosta' "
                "AND last_seen > %s",
                (reconnected,),
            ),
            timeout=120,
            interval=0.5,
            what="host A to heartbeat again",
        )
        cases = world.query(
            "SELECT run_id, case_id FROM testruns_testresult WHERE id = ANY(%s)", (stranded,)
        )

        def a_gave_up_every_stranded_case() -> bool:
            lines = [
                line
                for line in world.worker_log("hosta").splitlines()
                if "outcome discarded" in line or "case abandoned" in line
            ]
            return all(
                any(line.endswith(f"run={run} case={case}") for line in lines)
                for run, case in cases
            )

        wait_for(
            a_gave_up_every_stranded_case,
            timeout=120,
            interval=0.5,
            what="host A to discard or abandon every case it lost",
        )

        assert (
            world.query(
                "SELECT id, status, output, finished_at, attempts "
                "FROM testruns_testresult ORDER BY id"
            )
            == finished
        )
        world.assert_every_run_ended_and_every_slot_came_back(run_ids, cases=8)
        sampler.done.set()
        sampler.join()
        assert world.vendor_call("/_stats")["peak_concurrency"] <= 4
        provider = next(name for name in sampler.peaks if name.startswith("provider:"))
        assert sampler.peaks[provider] <= 4 and sampler.peaks["runs"] <= 4, sampler.peaks
