"""The process supervisor behind `make run` and `make test`.

    python -m project.stack run            # services, migrations, demo data, web, workers
    python -m project.stack test -- ARGS   # throwaway services, then pytest ARGS
    python -m project.stack exec -- CMD    # throwaway services, then CMD (benchmarks)

PostgreSQL and Redis start from their pip wheels unless DATABASE_URL / REDIS_URL are set.
Every child runs in its own session, so Ctrl-C reaches only this supervisor, which then
stops the children in order (web and workers first, Redis and PostgreSQL last) and waits
for each, leaving nothing behind.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

from project import embedded

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("VAR_DIR") or ROOT / "var")


class AlreadyRunning(SystemExit):
    pass


def hold_lock(path: Path):
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


class Child:
    """A long-running child process in its own session (so terminal signals skip it)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]):
        self.name = name
        self.process = subprocess.Popen(
            args, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=embedded.die_with_parent(signal.SIGTERM),
        )

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"{self.name} did not stop within {timeout:.0f}s; killing it", flush=True)
        # Whatever the child forked (Dramatiq's worker processes) shares its process group.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def start_services(stack: ExitStack, env: dict[str, str], *, data: Path, durable: bool) -> None:
    """Fill in DATABASE_URL and REDIS_URL in `env`, starting embedded servers where unset."""
    if not env.get("DATABASE_URL"):
        port = int(env.get("EMBEDDED_PG_PORT") or embedded.free_port())
        _refuse_busy_port(port, "EMBEDDED_PG_PORT")
        server = embedded.start_postgres(data / "postgres", port, durable=durable)
        stack.callback(server.stop)
        env["DATABASE_URL"] = embedded.ensure_database(server.url, "promptcards")
        print(f"PostgreSQL {server.url}/promptcards (data in {data / 'postgres'})", flush=True)
    if not env.get("REDIS_URL"):
        port = int(env.get("EMBEDDED_REDIS_PORT") or embedded.free_port())
        _refuse_busy_port(port, "EMBEDDED_REDIS_PORT")
        server = embedded.start_redis(data / "redis", port, durable=durable)
        stack.callback(server.stop)
        env["REDIS_URL"] = server.url
        print(f"Redis {server.url} (data in {data / 'redis'})", flush=True)


def _refuse_busy_port(port: int, variable: str) -> None:
    if embedded.port_is_open(port):
        raise SystemExit(f"Port {port} on 127.0.0.1 is already in use; set {variable} to another.")


def manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], env=env, cwd=ROOT, check=True)


def wait_for_stop(children: list[Child]) -> None:
    """Block until SIGINT/SIGTERM, or until a child dies on its own (then stop the rest)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        for child in children:
            if child.process.poll() is not None:
                print(f"{child.name} exited with code {child.process.returncode}; stopping.")
                return


def run() -> int:
    lock = hold_lock(VAR / "run.lock")
    env = dict(os.environ)
    env.setdefault("EMBEDDED_PG_PORT", "54329")
    env.setdefault("EMBEDDED_REDIS_PORT", "63799")
    host, port = env.get("WEB_HOST", "127.0.0.1"), env.get("WEB_PORT", "8000")
    with ExitStack() as stack:
        stack.callback(lock.close)
        start_services(stack, env, data=VAR, durable=True)
        manage(env, "migrate", "--noinput", "-v", "0")
        manage(env, "seed_demo")
        manage(env, "ensure_admin", "--password-file", str(VAR / "admin-password.txt"))
        _refuse_busy_port(int(port), "WEB_PORT")
        children = [
            Child("web", [sys.executable, "-m", "daphne", "-b", host, "-p", port,
                          "project.asgi:application"], env),
            Child("workers", [sys.executable, "manage.py", "rundramatiq",
                              "--processes", env.get("WORKER_PROCESSES", "2"),
                              "--threads", env.get("WORKER_THREADS", "8"),
                              "--worker-shutdown-timeout", "8000"], env),
        ]
        for child in reversed(children):
            stack.callback(child.stop)
        embedded.wait_until(lambda: embedded.port_is_open(int(port)), timeout=60,
                            what="The web server", process=children[0].process,
                            log="its output above")
        print(f"\nPrompt Card Runner is up: http://{host}:{port}/\n"
              f"Admin: http://{host}:{port}/admin/\nPress Ctrl-C to stop everything.\n",
              flush=True)
        wait_for_stop(children)
        print("Stopping web, workers, Redis and PostgreSQL...", flush=True)
    print("Stopped.")
    return 0


def with_throwaway_services(command: list[str]) -> int:
    """Run `command` against fresh PostgreSQL and Redis that are removed afterwards."""
    data = VAR / "test" / f"stack-{os.getpid()}"
    env = dict(os.environ)
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, data, ignore_errors=True)
        start_services(stack, env, data=data, durable=False)
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
        return with_throwaway_services([sys.executable, "-m", "pytest", *rest])
    return with_throwaway_services(rest)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except AlreadyRunning as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
