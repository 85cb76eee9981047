"""`make run`'s supervisor and secrets: the whole app comes up with passwords on PostgreSQL and
Redis and DEBUG off, a crashed worker or Redis comes back on its own, a child that keeps
crashing makes the supervisor give up, Ctrl-C leaves no process behind, and `make test`
touches no server it did not start.

One `make run` (the module-scoped `app`) serves the tests that need it, in file order; the
last of them presses Ctrl-C."""

from __future__ import annotations

import http.cookiejar
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg
import pytest

from project import embedded
from project.embedded import free_port
from project.stack import TEST_REFUSAL
from project.supervisor import Supervisor
from tests.conftest import ROOT, ChildProcess, wait_for


def stack_env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY"}
    }
    return env | {
        "VAR_DIR": str(tmp_path / "var"),
        "WEB_PORT": str(free_port()),
        "EMBEDDED_PG_PORT": str(free_port()),
        "EMBEDDED_REDIS_PORT": str(free_port()),
        "WORKER_PROCESSES": "2",
        "WORKER_THREADS": "2",
    }


@dataclass
class App:
    stack: ChildProcess
    env: dict[str, str]
    var: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.env['WEB_PORT']}"

    @property
    def pg_port(self) -> int:
        return int(self.env["EMBEDDED_PG_PORT"])

    @property
    def redis_port(self) -> int:
        return int(self.env["EMBEDDED_REDIS_PORT"])

    def secret(self, name: str) -> str:
        return (self.var / name).read_text().strip()

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.stack.process.pid).children()

    def child(self, part: str) -> list[psutil.Process]:
        found = []
        for proc in self.children():
            try:
                if part in " ".join(proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                continue
        return found


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("make-run")
    env = stack_env(tmp_path)
    stack = ChildProcess("stack", [sys.executable, "-m", "project.stack", "run"], env)
    try:
        wait_for(
            lambda: "is up" in stack.output() or stack.process.poll() is not None,
            timeout=120,
            what="make run to come up",
        )
        assert stack.process.poll() is None, stack.output()
        yield App(stack, env, tmp_path / "var")
    finally:
        if stack.process.poll() is None:
            family = psutil.Process(stack.process.pid).children(recursive=True)
            stack.stop(signal.SIGKILL)
            for proc in family:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
        else:
            stack.stop()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def browser() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(
        NoRedirect, urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )


def get(
    opener: urllib.request.OpenerDirector,
    url: str,
    data: dict | None = None,
) -> tuple[int, str]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    try:
        with opener.open(url, data=body, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except OSError:
        return 0, ""


def log_in_as_admin(app: App) -> urllib.request.OpenerDirector:
    opener = browser()
    status, page = get(opener, f"{app.base_url}/login/")
    assert status == 200, page
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    status, page = get(
        opener,
        f"{app.base_url}/login/",
        {
            "csrfmiddlewaretoken": token,
            "username": "admin",
            "password": app.secret("admin-password.txt"),
        },
    )
    assert status == 302, f"login failed ({status}): {page[:2000]}"
    return opener


def redis_says(port: int, *commands: str) -> list[str]:
    """Raw RESP, so that what the server answers is what the test reads."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        replies = []
        for command in commands:
            sock.sendall(command.encode() + b"\r\n")
            replies.append(sock.recv(1024).decode().strip())
        return replies


# --- make run ------------------------------------------------------------------------------


def test_run_comes_up_with_an_admin_login_and_refuses_a_second_copy(app):
    assert "Log in as admin / " in app.stack.output(), app.stack.output()
    assert app.secret("admin-password.txt") in app.stack.output()

    second = subprocess.run(
        [sys.executable, "-m", "project.stack", "run"],
        env=app.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert "already running" in second.stderr

    names = " ".join(" ".join(p.cmdline()) for p in app.children())
    for part in ["postgres", "redis-server", "daphne"]:
        assert part in names
    # Each worker is a child of its own, so one dying takes no other down.
    assert len(app.child("dramatiq")) == 2


def test_run_generates_each_secret_once_into_var_readable_by_the_owner_only(app):
    for name in [
        "postgres-password.txt",
        "redis-password.txt",
        "secret-key.txt",
        "admin-password.txt",
        "redis/redis.conf",
    ]:
        assert (app.var / name).stat().st_mode & 0o777 == 0o600, name
    assert len(app.secret("secret-key.txt")) >= 50
    for name in ["postgres-password.txt", "redis-password.txt", "secret-key.txt"]:
        assert app.secret(name) not in app.stack.output(), f"{name} was printed"
    daphne = app.child("daphne")[0]
    assert daphne.environ()["SECRET_KEY"] == app.secret("secret-key.txt")
    assert daphne.environ()["DEBUG"] == "0"


def test_embedded_postgres_refuses_a_connection_without_the_generated_password(app):
    params = {
        "host": "127.0.0.1",
        "port": app.pg_port,
        "user": "postgres",
        "dbname": "promptcards",
        "passfile": os.devnull,
        "connect_timeout": 5,
    }
    for password in ["", "not-the-password"]:
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(**params, password=password).close()
    with psycopg.connect(**params, password=app.secret("postgres-password.txt")) as conn:
        assert conn.execute("SELECT count(*) FROM auth_user").fetchone()[0] >= 1


def test_embedded_redis_answers_noauth_without_the_generated_password(app):
    assert redis_says(app.redis_port, "PING")[0].startswith("-NOAUTH")
    password = app.secret("redis-password.txt")
    assert redis_says(app.redis_port, "AUTH wrong-password", f"AUTH {password}", "PING") == [
        "-WRONGPASS invalid username-password pair or user is disabled.",
        "+OK",
        "+PONG",
    ]


def test_run_has_debug_off_answers_a_missing_page_without_a_debug_page_and_serves_static(app):
    for opener in [browser(), log_in_as_admin(app)]:
        status, page = get(opener, f"{app.base_url}/no-such-page")
        assert status in {302, 404}, status
        assert "Traceback" not in page and "DEBUG = True" not in page, page[:2000]
    assert status == 404  # logged in: a plain "not found"
    for path in ["/static/testruns/app.css", "/static/admin/css/base.css"]:
        assert get(browser(), app.base_url + path)[0] == 200, path


def test_supervisor_restarts_only_the_sigkilled_worker_and_the_app_keeps_serving(app):
    ready = "Worker process is ready for action."
    wait_for(lambda: app.stack.output().count(ready) == 2, timeout=60, what="both workers")
    mains = {proc.pid for proc in app.child("dramatiq")}
    victim_main = psutil.Process(min(mains))
    [victim] = victim_main.children()  # Dramatiq's worker process

    victim.send_signal(signal.SIGKILL)  # what the OOM killer does

    wait_for(
        lambda: re.search(r"workers-\d restarted as pid", app.stack.output()),
        timeout=30,
        what="the supervisor to restart the worker",
    )
    now = {proc.pid for proc in app.child("dramatiq")}
    assert len(now) == 2 and victim_main.pid not in now
    assert mains - {victim_main.pid} <= now  # the other worker was left alone
    assert re.search(
        r"workers-\d \(pid \d+\) exited with code \d+; restarting in 0\.5s "
        r"\(crash 1 of 5 allowed within 60s\)",
        app.stack.output(),
    )
    wait_for(
        lambda: app.stack.output().count(ready) == 3, timeout=60, what="the new worker to boot"
    )
    assert get(browser(), f"{app.base_url}/healthz")[0] == 200
    assert get(browser(), f"{app.base_url}/login/")[0] == 200


def test_supervisor_restarts_killed_redis_on_the_same_port_with_its_password(app):
    old = app.child("redis-server")[0]
    password = app.secret("redis-password.txt")

    old.send_signal(signal.SIGKILL)

    wait_for(
        lambda: "redis is up again" in app.stack.output(),
        timeout=30,
        what="the supervisor to restart Redis",
    )
    assert old.pid not in {proc.pid for proc in app.child("redis-server")}
    assert not psutil.pid_exists(old.pid), "the killed Redis was left a zombie"
    assert redis_says(app.redis_port, f"AUTH {password}", "PING") == ["+OK", "+PONG"]
    wait_for(
        lambda: get(browser(), f"{app.base_url}/healthz")[0] == 200,
        timeout=30,
        what="/healthz to answer 200 after Redis came back",
    )


def test_ctrl_c_stops_everything_in_order_and_leaves_no_process(app):
    family = psutil.Process(app.stack.process.pid).children(recursive=True)
    assert family

    app.stack.process.send_signal(signal.SIGINT)  # what Ctrl-C sends

    assert app.stack.process.wait(60) == 0
    assert "Stopped." in app.stack.output()
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []


# --- make test -----------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["DATABASE_URL", "REDIS_URL"])
def test_make_test_refuses_database_or_redis_url_from_the_environment(tmp_path, variable):
    with socket.socket() as listener:  # a "server" that must never hear from make test
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        url = {
            "DATABASE_URL": f"postgres://app:secret@127.0.0.1:{port}/production",
            "REDIS_URL": f"redis://127.0.0.1:{port}/0",
        }[variable]
        env = {k: v for k, v in os.environ.items() if not k.endswith(("DATABASE_URL", "REDIS_URL"))}
        result = subprocess.run(
            [sys.executable, "-m", "project.stack", "test", "--", "-q"],
            env=env | {variable: url, "VAR_DIR": str(tmp_path / "var")},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert result.returncode != 0
    assert f"{variable} set in the environment: {TEST_REFUSAL}" in result.stderr
    assert not (tmp_path / "var").exists()


def test_suite_refuses_to_flush_a_redis_that_make_test_did_not_start(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PROMPTCARDS_TEST_SERVICES", "DATABASE_URL", "REDIS_URL"}
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_settings.py::test_production_without_a_secret_key_refuses_to_start",
        ],
        env=env | {"VAR_DIR": str(tmp_path)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "run only against the services `make test` starts" in result.stdout + result.stderr
    assert "passed" not in result.stdout


# --- the Supervisor on its own -------------------------------------------------------------


def python_child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def test_supervisor_gives_up_on_a_child_that_keeps_crashing_and_stops_the_rest():
    lines: list[str] = []
    supervisor = Supervisor(log=lines.append)  # 5 crashes within 60 s
    supervisor.add("steady", lambda: python_child("import time; time.sleep(600)"))
    supervisor.add("crasher", lambda: python_child("import sys; sys.exit(3)"))
    supervisor.start()
    steady = supervisor.process("steady")
    never = threading.Event()
    backstop = threading.Timer(60, never.set)
    backstop.start()
    started = time.monotonic()
    try:
        reason = supervisor.watch(never)
    finally:
        backstop.cancel()
        supervisor.stop()

    assert reason is not None, "the supervisor never gave up"
    assert time.monotonic() - started < 60
    assert re.fullmatch(
        r"crasher \(pid \d+\) exited with code 3; it crashed 5 times within "
        r"60s, so the supervisor gives up and stops everything",
        reason,
    )
    assert supervisor.restarts("crasher") == 4
    restarts = [
        re.fullmatch(
            r"crasher \(pid \d+\) exited with code 3; restarting in ([\d.]+)s "
            r"\(crash (\d) of 5 allowed within 60s\)",
            line,
        )
        for line in lines
        if "restarting in" in line
    ]
    assert [(m.group(1), m.group(2)) for m in restarts] == [
        ("0.5", "1"),
        ("1.0", "2"),
        ("2.0", "3"),
        ("4.0", "4"),
    ]
    assert lines[-1] == reason  # the last word, in the log too
    assert steady.poll() is not None  # stopped with the rest
    assert supervisor.restarts("steady") == 0


def test_supervisor_brings_back_postgres_killed_or_shut_down_on_its_port_with_its_password(
    tmp_path,
):
    data, port = tmp_path / "postgres", free_port()
    password = embedded.prepare_postgres(data)
    url = embedded.postgres_url(port, password) + "/postgres"
    supervisor = Supervisor(log=print)
    supervisor.add(
        "postgres",
        lambda: embedded.spawn_postgres(data, port, durable=False),
        stop_signal=signal.SIGINT,
        group="services",
        ready=lambda: embedded.pg_accepts(port),
    )
    supervisor.start()
    stop = threading.Event()
    watcher = threading.Thread(target=supervisor.watch, args=(stop,), daemon=True)
    watcher.start()
    try:
        for restarts, sig in enumerate([signal.SIGKILL, signal.SIGINT], start=1):
            with psycopg.connect(url, autocommit=True) as conn:  # a backend in the group
                conn.execute("SELECT 1")
                old = supervisor.process("postgres")
                old.send_signal(sig)  # killed outright / a fast shutdown
                wait_for(
                    lambda n=restarts: (
                        supervisor.restarts("postgres") == n and supervisor.is_up("postgres")
                    ),
                    timeout=60,
                    what="PostgreSQL to come back",
                )
            assert supervisor.process("postgres").pid != old.pid
            with psycopg.connect(url, connect_timeout=5) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        stop.set()
        watcher.join(10)
        supervisor.stop()
    assert supervisor.process("postgres").poll() is not None


def test_a_trust_cluster_from_an_older_checkout_gets_a_password_and_keeps_its_data(tmp_path):
    data, port = tmp_path / "var" / "postgres", free_port()
    # What older checkouts left in var/postgres: a cluster that trusts every connection.
    account = embedded._pg_account()
    data.mkdir(parents=True)
    if account is not None:
        embedded._pg_package()[1].ensure_prefix_permissions(data)
        os.chown(data, account.pw_uid, account.pw_gid)
    subprocess.run(
        [
            embedded._pg_bin("initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-instructions",
        ],
        check=True,
        capture_output=True,
        **embedded._as_account(account),
    )
    old = embedded.spawn_postgres(data, port, durable=False)
    trusting_url = f"postgres://postgres@127.0.0.1:{port}/postgres"
    try:
        wait_for(lambda: embedded.pg_accepts(port), what="the old cluster")
        with psycopg.connect(trusting_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (value text)")
            conn.execute("INSERT INTO kept VALUES ('from the old checkout')")
    finally:
        old.send_signal(signal.SIGINT)
        old.wait(30)

    server = embedded.start_postgres(data, port, durable=False)
    try:
        with psycopg.connect(server.url + "/postgres") as conn:
            assert conn.execute("SELECT value FROM kept").fetchone() == ("from the old checkout",)
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(trusting_url, passfile=os.devnull, connect_timeout=5).close()
    finally:
        server.stop()
    password_file = embedded.postgres_password_file(data)
    assert password_file.stat().st_mode & 0o777 == 0o600
    assert password_file.read_text().strip() in server.url
    assert not embedded._hba_trusts(data)
