"""What runs behind `make run` and `make test`.

    python -m project.stack run            # services, migrations, demo data, web, workers
    python -m project.stack test -- ARGS   # throwaway services, then pytest ARGS
    python -m project.stack exec -- CMD    # throwaway services, then CMD (benchmarks)

PostgreSQL and Redis start from their pip wheels unless DATABASE_URL / REDIS_URL are set
(`test` refuses those: it must never flush a Redis or create databases on a server it did
not start; TEST_DATABASE_URL / TEST_REDIS_URL choose external ones on purpose). Under `run`
a Supervisor (project.supervisor) restarts any child that dies; every child runs in its own
session, so Ctrl-C reaches only the supervisor, which then stops the children in order (web
and workers first, Redis and PostgreSQL last) and waits for each, leaving nothing behind.
See docs/operations.md.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import IO

from project import embedded, secret_files
from project.supervisor import StartFailed, Supervisor

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("VAR_DIR") or ROOT / "var")

TEST_REFUSAL = (
    "make test starts its own PostgreSQL and Redis; to use external ones set "
    "TEST_DATABASE_URL and TEST_REDIS_URL"
)
TRUE = {"1", "true", "yes", "on"}


class AlreadyRunning(SystemExit):
    pass


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} supervisor: {message}", flush=True)


def hold_lock(path: Path) -> IO[str]:
    """Refuse a second `make run` on the same var/ instead of letting two postmasters fight."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        raise AlreadyRunning(
            f"Prompt Card Runner is already running from {ROOT} (supervisor pid {owner}).\n"
            "Stop it with Ctrl-C in its terminal, or open http://127.0.0.1:8000/ to use it."
        ) from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A long-running child in its own session (so terminal signals skip it) that gets
    SIGTERM if the supervisor dies outright."""
    return subprocess.Popen(
        args,
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=embedded.die_with_parent(signal.SIGTERM),
    )


def add_services(
    supervisor: Supervisor, env: dict[str, str], *, data: Path, durable: bool
) -> str | None:
    """Add embedded PostgreSQL / Redis where DATABASE_URL / REDIS_URL are unset, filling in
    REDIS_URL. Returns PostgreSQL's server URL when it is embedded: DATABASE_URL needs the
    database created once the server is up (`embedded.ensure_database`)."""
    server_url = None
    if not env.get("DATABASE_URL"):
        pg_port = int(env.get("EMBEDDED_PG_PORT") or embedded.free_port())
        _refuse_busy_port(pg_port, "EMBEDDED_PG_PORT")
        pg_data = data / "postgres"
        password = embedded.prepare_postgres(pg_data)
        supervisor.add(
            "postgres",
            lambda: embedded.spawn_postgres(pg_data, pg_port, durable=durable),
            stop_signal=signal.SIGINT,  # PostgreSQL's "fast shutdown"
            group="services",
            ready=lambda: embedded.pg_accepts(pg_port),
            stop_timeout=30,
        )
        server_url = embedded.postgres_url(pg_port, password)
        print(
            f"PostgreSQL on 127.0.0.1:{pg_port}, database promptcards (data in {pg_data}, "
            f"password in {embedded.postgres_password_file(pg_data)})",
            flush=True,
        )
    if not env.get("REDIS_URL"):
        redis_port = int(env.get("EMBEDDED_REDIS_PORT") or embedded.free_port())
        _refuse_busy_port(redis_port, "EMBEDDED_REDIS_PORT")
        redis_data = data / "redis"
        redis_password = embedded.prepare_redis(redis_data)
        supervisor.add(
            "redis",
            lambda: embedded.spawn_redis(redis_data, redis_port, redis_password, durable=durable),
            group="services",
            ready=lambda: embedded.redis_accepts(redis_port, redis_password),
            ready_timeout=30,
        )
        env["REDIS_URL"] = embedded.redis_url(redis_port, redis_password)
        print(
            f"Redis on 127.0.0.1:{redis_port} (data in {redis_data}, password in "
            f"{embedded.redis_password_file(redis_data)})",
            flush=True,
        )
    return server_url


def _refuse_busy_port(port: int, variable: str) -> None:
    if embedded.port_is_open(port):
        raise SystemExit(f"Port {port} on 127.0.0.1 is already in use; set {variable} to another.")


def manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], env=env, cwd=ROOT, check=True)


def app_environment(environ: dict[str, str], var: Path) -> dict[str, str]:
    """`make run` is a local server on plain HTTP: DEBUG off (Django's debug page shows
    settings and code to anyone who finds an error) with a SECRET_KEY kept in var/, unless
    DEBUG=1 / SECRET_KEY are given; no HTTPS redirect or secure-only cookies unless
    BEHIND_TLS_PROXY says a proxy terminates TLS."""
    env = dict(environ)
    env.setdefault("EMBEDDED_PG_PORT", "54329")
    env.setdefault("EMBEDDED_REDIS_PORT", "63799")
    if not env.get("DEBUG"):
        env["DEBUG"] = "0"
    if not env.get("SECRET_KEY"):
        env["SECRET_KEY"] = secret_files.load_or_create_secret(var / "secret-key.txt", 50)
    if env.get("BEHIND_TLS_PROXY", "").strip().lower() not in TRUE:
        for name in (
            "SECURE_SSL_REDIRECT",
            "SESSION_COOKIE_SECURE",
            "CSRF_COOKIE_SECURE",
            "SECURE_HSTS_SECONDS",
        ):
            env.setdefault(name, "0")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run() -> int:
    lock = hold_lock(VAR / "run.lock")
    env = app_environment(dict(os.environ), VAR)
    host, port = env.get("WEB_HOST", "127.0.0.1"), env.get("WEB_PORT", "8000")
    processes = int(env.get("WORKER_PROCESSES") or 2)
    threads = env.get("WORKER_THREADS") or "8"
    supervisor = Supervisor(log=say)
    stop = threading.Event()
    watching = False

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        if not watching and not supervisor_stopping.is_set():
            raise KeyboardInterrupt  # still starting: unwind, stopping what has started

    supervisor_stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    reason = None
    with ExitStack() as stack:
        stack.callback(lock.close)
        stack.callback(supervisor.stop)
        stack.callback(supervisor_stopping.set)
        server_url = add_services(supervisor, env, data=VAR, durable=True)
        supervisor.start()
        if server_url:
            env["DATABASE_URL"] = embedded.ensure_database(server_url, "promptcards")
        manage(env, "migrate", "--noinput", "-v", "0")
        manage(env, "seed_demo")
        manage(env, "ensure_admin", "--password-file", str(VAR / "admin-password.txt"))
        _refuse_busy_port(int(port), "WEB_PORT")
        web = [sys.executable, "-m", "daphne", "-b", host, "-p", port, "project.asgi:application"]
        supervisor.add(
            "web", lambda: spawn(web, env), ready=lambda: embedded.port_is_open(int(port))
        )
        # One Dramatiq process per child: when the OOM killer takes a worker process,
        # Dramatiq's main process exits, and only that one child is restarted.
        worker = [sys.executable, "manage.py", "rundramatiq", "--processes", "1"]
        worker += ["--threads", threads, "--worker-shutdown-timeout", "8000"]
        for number in range(1, processes + 1):
            supervisor.add(f"workers-{number}", lambda: spawn(worker, env))
        supervisor.start()
        debug = "on (DEBUG=1)" if env["DEBUG"].strip().lower() in TRUE else "off"
        print(
            f"\nPrompt Card Runner is up: http://{host}:{port}/\n"
            f"Admin: http://{host}:{port}/admin/\nDEBUG is {debug}. "
            "Crashed processes are restarted. Press Ctrl-C to stop everything.\n",
            flush=True,
        )
        watching = True
        reason = supervisor.watch(stop)
        watching = False
        supervisor_stopping.set()
        if reason:
            print(f"\nGiving up: {reason}.", file=sys.stderr, flush=True)
        print("Stopping web, workers, Redis and PostgreSQL...", flush=True)
    print("Stopped.", flush=True)
    return 1 if reason else 0


def test_environment(environ: dict[str, str]) -> dict[str, str]:
    """The environment of `make test`: no DATABASE_URL / REDIS_URL from the caller (they may
    well point at real data) unless TEST_DATABASE_URL / TEST_REDIS_URL replace them."""
    env = dict(environ)
    inherited = [
        name
        for name in ("DATABASE_URL", "REDIS_URL")
        if env.get(name) and not env.get(f"TEST_{name}")
    ]
    if inherited:
        raise SystemExit(f"{' and '.join(inherited)} set in the environment: {TEST_REFUSAL}.")
    for name in ("DATABASE_URL", "REDIS_URL"):
        env[name] = env.get(f"TEST_{name}", "")
    # tests/conftest.py flushes Redis only when this says the stack chose the services.
    env["PROMPTCARDS_TEST_SERVICES"] = "1"
    return env


def with_throwaway_services(command: list[str], env: dict[str, str]) -> int:
    """Run `command` against fresh PostgreSQL and Redis that are removed afterwards."""
    data = VAR / "test" / f"stack-{os.getpid()}"
    supervisor = Supervisor(log=say)
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, data, ignore_errors=True)
        stack.callback(supervisor.stop)
        server_url = add_services(supervisor, env, data=data, durable=False)
        supervisor.start()
        if server_url:
            env["DATABASE_URL"] = embedded.ensure_database(server_url, "promptcards")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        return subprocess.run(command, env=env, cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"run", "test", "exec"}:
        print(__doc__)
        return 2
    if argv[0] == "run":
        return run()
    rest = argv[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if argv[0] == "test":
        env = test_environment(dict(os.environ))
        return with_throwaway_services([sys.executable, "-m", "pytest", *rest], env)
    return with_throwaway_services(rest, dict(os.environ))


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except AlreadyRunning as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    except StartFailed as exc:
        print(f"Could not start: {exc}. Stopped everything.", file=sys.stderr)
        sys.exit(1)
    except subprocess.CalledProcessError as exc:
        command = " ".join(exc.cmd[1:]) if isinstance(exc.cmd, list) else exc.cmd
        print(
            f"`{command}` failed with exit code {exc.returncode} (its output is above). "
            "Stopped everything.",
            file=sys.stderr,
        )
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
