"""This worker process: who holds its leases (host, pid and a boot id), whether it is
stopping, and whether it may keep handing cases to itself. Plain state, importable from
anywhere in the engine (and by the middleware while Django is still loading)."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading

import dramatiq

log = logging.getLogger(__name__)


_stopping = threading.Event()
_worker: dramatiq.Worker | None = None
_pressure: str | None = None  # why this host takes no new case, refreshed by the heartbeat


def host_pressure() -> str | None:
    return _pressure


def is_running() -> bool:
    """False once this worker process has been asked to stop."""
    return not _stopping.is_set()


def may_keep_cases() -> bool:
    """Whether a thread that freed a slot should run the next case itself. Not while this
    process has prefetched messages waiting (they would starve behind a thread that keeps
    handing cases to itself), nor while stopping."""
    return is_running() and _pressure is None and (_worker is None or _worker.work_queue.empty())


_boot: tuple[int, str] = (0, "")
_boot_lock = threading.Lock()


def host_and_pid() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_id() -> str:
    """Leases are held per worker process start: its heartbeat keeps all of them alive. The
    random boot id tells this process from an earlier one that had the same host name and
    pid (a restarted container), whose leases must not be renewed by us."""
    global _boot
    # Under a lock: two threads taking their first cases at once would otherwise draw two
    # boot ids, and the boot's hand-back of "an earlier process with our pid" would then take
    # the other thread's case from under it.
    with _boot_lock:
        if _boot[0] != os.getpid():  # computed after a fork too, never inherited
            _boot = (os.getpid(), secrets.token_hex(4))
        return f"{host_and_pid()}:{_boot[1]}"


def note_pressure(reason: str | None) -> None:
    """Why this host takes no new case (None: it takes them), as the heartbeat last saw."""
    global _pressure
    _pressure = reason


def booted(worker: dramatiq.Worker) -> None:
    global _worker
    _worker = worker
    _stopping.clear()


def stop() -> None:
    _stopping.set()


def stopping() -> threading.Event:
    return _stopping
