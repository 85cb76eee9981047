"""Fixtures against the real services `make test` starts: PostgreSQL, Redis, Dramatiq worker
processes and the ASGI server as a separate process. Nothing here is mocked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import dramatiq
import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import Permission
from django.db import connection
from django.db.models import Count

from project.embedded import die_with_parent, free_port, port_is_open
from testruns.catalog.cards import snapshot_version
from testruns.engine import admission, execution
from testruns.models import PromptCard, Provider, Semaphore, TestCase, TestResult, TestRun

pytest_plugins = ["tests.fake_llm", "tests.browser"]

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_DIR = Path(os.environ.get("TEST_OUTPUT_DIR", ROOT / "test-output"))


def wait_for(predicate, *, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def run_in_this_thread(
    run: TestRun, *, holder: str = "test-worker", hand_over: bool = False
) -> TestRun:
    """Admit and execute every case of `run` in this thread, one at a time, until none is
    left: as a worker thread would, handing cases over to itself when `hand_over`."""
    admission.admit_runs()
    while True:
        admission.admit_cases(run.provider_id)
        admitted = list(
            TestResult.objects.filter(run=run, status="running", leases__holder="").values_list(
                "pk", flat=True
            )
        )
        if not admitted:
            break
        for result_id in admitted:
            execution.run_admitted_case(result_id, holder, keep_going=lambda: hand_over)
    run.refresh_from_db()
    return run


def assert_every_slot_returned() -> None:
    """Every semaphore's in_use equals its lease rows, and both are zero."""
    for semaphore in Semaphore.objects.annotate(leases_held=Count("leases")):
        assert semaphore.in_use == semaphore.leases_held == 0, semaphore.name


@pytest.fixture(autouse=True, scope="session")
def _redis_is_clean():
    """Each session starts with an empty broker and channel layer. FLUSHDB on a Redis that
    `make test` did not start (make run's, production's) would wipe someone's queue, so the
    suite refuses to run without the marker `python -m project.stack test` sets."""
    if os.environ.get("PROMPTCARDS_TEST_SERVICES") != "1" or (
        settings.REDIS_URL != os.environ.get("REDIS_URL")
    ):
        pytest.exit(
            "The tests flush Redis and create databases, so they run only against the "
            "services `make test` starts (or TEST_DATABASE_URL / TEST_REDIS_URL): run "
            "`make test ARGS=...` or `python -m project.stack test -- ARGS`.",
            returncode=2,
        )
    redis.Redis.from_url(settings.REDIS_URL).flushdb()


@pytest.fixture(scope="session")
def process_env(django_db_setup) -> dict[str, str]:
    """Environment for child processes: the same services, but the test database."""

    parts = urlsplit(os.environ["DATABASE_URL"])
    test_db_url = urlunsplit(parts._replace(path="/" + connection.settings_dict["NAME"]))
    env = dict(
        os.environ,
        DATABASE_URL=test_db_url,
        PYTHONUNBUFFERED="1",
        DJANGO_SETTINGS_MODULE="project.settings",
    )
    return env


class ChildProcess:
    def __init__(self, name: str, args: list[str], env: dict[str, str]):
        OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = OUTPUT_DIR / f"{name}-{os.getpid()}-{time.monotonic_ns()}.log"
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            args,
            env=env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # A test session killed outright must not leave workers polling forever.
            preexec_fn=die_with_parent(),
        )

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """SIGTERM goes to the main process, which stops its own children (Dramatiq treats a
        second SIGTERM as "kill now"); SIGKILL takes the whole process group at once."""
        if self.process.poll() is None:
            if sig == signal.SIGKILL:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        self.process.wait()
        self.log.close()


def start_workers(env: dict[str, str], *, processes: int = 1, threads: int = 4) -> ChildProcess:
    """Real Dramatiq worker processes, ready once every process has booted."""
    worker = ChildProcess(
        "worker",
        [
            sys.executable,
            "manage.py",
            "rundramatiq",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
            "--worker-shutdown-timeout",
            "8000",
        ],
        env,
    )
    wait_for(
        lambda: (
            worker.output().count("Worker process is ready for action.") >= processes
            or worker.process.poll() is not None
        ),
        timeout=60,
        what="workers to boot",
    )
    assert worker.process.poll() is None, worker.output()
    return worker


@pytest.fixture
def worker_factory(process_env):
    """Starts real workers for this test. The broker is shared by the whole session, and
    messages that earlier tests sent without a worker to take them (runs launched only to
    inspect the queue page, say) would otherwise sit ahead of this test's cases."""
    dramatiq.get_broker().flush_all()
    started: list[ChildProcess] = []

    def start(*, env: dict[str, str] | None = None, **kwargs) -> ChildProcess:
        worker = start_workers(process_env | (env or {}), **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
        # Shown by pytest only when the test fails: what the workers said before it did.
        print(f"--- {worker.log_path.name} (last lines) ---\n{worker.output()[-4000:]}")


@pytest.fixture(scope="session")
def asgi_server(process_env):
    """The real ASGI app (HTTP and WebSocket) served by daphne in its own process."""
    port = free_port()
    server = ChildProcess(
        "daphne",
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
        process_env,
    )
    wait_for(
        lambda: port_is_open(port) or server.process.poll() is not None,
        timeout=60,
        what="daphne to listen",
    )
    assert server.process.poll() is None, server.output()
    yield f"127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("alice", password="alice-password-1")


@pytest.fixture
def launcher(user):
    user.user_permissions.add(
        Permission.objects.get(codename="launch_testrun"),
        Permission.objects.get(codename="cancel_testrun"),
    )
    return user


@pytest.fixture
def simulator(db):
    return Provider.objects.create(
        name="Test simulator",
        kind=Provider.Kind.SIMULATOR,
        model="sim",
        parameters={"latency_ms": 50, "jitter_ms": 0, "error_rate": 0},
    )


@pytest.fixture
def make_card(db, user):
    def make(slug: str = "greeting", cases: int = 3, **fields) -> PromptCard:
        card = PromptCard.objects.create(
            name=fields.pop("name", slug.title()),
            slug=slug,
            owner=user,
            template=fields.pop("template", "Say hello to {{ name }}."),
            system_prompt=fields.pop("system_prompt", "Be brief."),
            **fields,
        )
        for i in range(cases):
            TestCase.objects.create(
                card=card,
                name=f"case {i}",
                variables={"name": f"N{i}"},
                assertions=[{"type": "contains", "value": f"N{i}"}],
                order=i,
            )
        snapshot_version(card)
        return card

    return make


@pytest.fixture
def session_cookie(client, launcher) -> str:
    client.force_login(launcher)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
