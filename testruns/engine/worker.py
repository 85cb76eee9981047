"""What every Dramatiq worker process runs besides its actors: a heartbeat thread that keeps
this process's leases alive, a sweeper thread that repairs what others left behind, and a
hand-back of held cases at start (an earlier process with our host and pid) and shutdown.

Heartbeat and sweep run in separate threads so that a slow sweep (a broker or a channel
layer that takes seconds to answer) can never let a live worker's leases expire, which
would have its paid calls run a second time elsewhere."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading

import dramatiq
from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models.functions import Now
from django.utils import timezone

from testruns.engine import gate

log = logging.getLogger(__name__)


_stopping = threading.Event()
_worker: dramatiq.Worker | None = None
_pressure: str | None = None  # why this host takes no new case, refreshed by the keeper


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


def host_and_pid() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_id() -> str:
    """Leases are held per worker process start: its heartbeat keeps all of them alive. The
    random boot id tells this process from an earlier one that had the same host name and
    pid (a restarted container), whose leases must not be renewed by us."""
    global _boot
    if _boot[0] != os.getpid():  # computed after a fork too, never inherited
        _boot = (os.getpid(), secrets.token_hex(4))
    return f"{host_and_pid()}:{_boot[1]}"


class LeaseKeeper(dramatiq.Middleware):
    def __init__(self) -> None:
        self.stopping = _stopping
        self.threads: list[threading.Thread] = []

    def before_worker_boot(self, broker, worker) -> None:
        """Prefetch no more messages than there are threads. Dramatiq's default (twice as
        many) lets one process hoard admitted cases that then wait behind threads busy
        handing cases to themselves, while they hold call slots and other processes idle."""
        worker.queue_prefetch = worker.worker_threads

    def after_worker_boot(self, broker, worker) -> None:
        global _worker
        _worker = worker
        self.stopping.clear()
        try:
            handed = gate.hand_back_earlier_holders(host_and_pid(), holder_id())
            if handed:
                log.warning("handed back %d case(s) of an earlier process with this host and "
                            "pid", handed)
        except Exception:  # the sweeper reclaims them after the TTL instead
            log.exception("handing back an earlier holder's cases failed")
        finally:
            connection.close()
        self.threads = [
            threading.Thread(target=self.beat, name="lease-heartbeat", daemon=True),
            threading.Thread(target=self.sweep, name="lease-sweeper", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def before_worker_shutdown(self, broker, worker) -> None:
        self.stopping.set()

    def after_worker_shutdown(self, broker, worker) -> None:
        """Cases still held after the shutdown grace period go back to the queue now, so
        another worker takes them without waiting for the lease TTL."""
        # Imported here: django_dramatiq builds this middleware before the app registry is
        # ready, so modules that import models cannot be imported at the top.
        from testruns.models import WorkerHeartbeat

        for thread in self.threads:
            thread.join(timeout=5)
        try:
            handed = gate.hand_back(holder_id())
            if handed:
                log.warning("handed back %d unfinished case(s) on shutdown", handed)
            WorkerHeartbeat.objects.filter(holder=holder_id()).delete()
        finally:
            connection.close()

    def beat(self) -> None:
        """Renew this process's leases every third of their TTL, and its heartbeat row."""
        me = holder_id()
        started = timezone.now()
        every = float(settings.LEASE_TTL_SECONDS) / 3
        self._repeat(every, lambda: (gate.heartbeat(me), record_heartbeat(me, started)),
                     what="heartbeat")

    def sweep(self) -> None:
        """Stop waiting on cases whose lease is gone, and repair what crashes left behind."""
        # Imported here: they import models, which the app registry is not ready for when
        # django_dramatiq builds this middleware.
        from testruns.engine import inflight, sweeper

        self._repeat(float(settings.SWEEP_INTERVAL_SECONDS),
                     lambda: (inflight.notice_lost_leases(), sweeper.sweep()), what="sweep")

    def _repeat(self, interval: float, tick, *, what: str) -> None:
        """Call tick() every `interval` seconds until the worker stops; after a failure (the
        database restarting) try again within a second, on a fresh connection."""
        wait = 0.0
        while not self.stopping.wait(wait):
            try:
                close_old_connections()
                tick()
                wait = interval
            except Exception:
                wait = min(interval, 1.0)
                log.exception("%s failed; trying again in %.1fs", what, wait)
                connection.close()
        connection.close()


def record_heartbeat(holder: str, started) -> None:
    """Refresh this process's row, and whether its host has room for new cases."""
    global _pressure
    from testruns.models import WorkerHeartbeat
    from testruns.ops import host_load

    snapshot = host_load.host_snapshot()
    _pressure = host_load.host_pressure(snapshot)
    WorkerHeartbeat.objects.update_or_create(holder=holder, defaults={
        "hostname": socket.gethostname(), "pid": os.getpid(), "started_at": started,
        "last_seen": Now(), "cpu_percent": snapshot.cpu_percent,
        "memory_available_mb": snapshot.memory_available_mb,
        "load_average": snapshot.load_average[0],
        "accepting": _pressure is None, "note": _pressure or "",
    })
