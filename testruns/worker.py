"""What every Dramatiq worker process runs besides its actors: a lease keeper thread that
heartbeats this process's leases and sweeps, and a hand-back of held cases on shutdown."""

from __future__ import annotations

import logging
import os
import socket
import threading

import dramatiq
from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models.functions import Now
from django.utils import timezone

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


def holder_id() -> str:
    """Leases are held per worker process: its heartbeat keeps all of them alive."""
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaseKeeper(dramatiq.Middleware):
    def __init__(self) -> None:
        self.stopping = _stopping
        self.thread: threading.Thread | None = None

    def before_worker_boot(self, broker, worker) -> None:
        """Prefetch no more messages than there are threads. Dramatiq's default (twice as
        many) lets one process hoard admitted cases that then wait behind threads busy
        handing cases to themselves, while they hold call slots and other processes idle."""
        worker.queue_prefetch = worker.worker_threads

    def after_worker_boot(self, broker, worker) -> None:
        global _worker
        _worker = worker
        self.stopping.clear()
        self.thread = threading.Thread(target=self.keep, name="lease-keeper", daemon=True)
        self.thread.start()

    def before_worker_shutdown(self, broker, worker) -> None:
        self.stopping.set()

    def after_worker_shutdown(self, broker, worker) -> None:
        """Cases still held after the shutdown grace period go back to the queue now, so
        another worker takes them without waiting for the lease TTL."""
        if self.thread:
            self.thread.join(timeout=5)
        from testruns import gate
        from testruns.models import WorkerHeartbeat

        try:
            handed = gate.hand_back(holder_id())
            if handed:
                log.warning("handed back %d unfinished case(s) on shutdown", handed)
            WorkerHeartbeat.objects.filter(holder=holder_id()).delete()
        finally:
            connection.close()

    def keep(self) -> None:
        from testruns import gate, inflight, sweeper

        me = holder_id()
        interval = float(settings.SWEEP_INTERVAL_SECONDS)
        beats_every = max(1, int(settings.LEASE_TTL_SECONDS / 3 / interval))
        tick = 0
        started = timezone.now()
        while not self.stopping.wait(interval if tick else 0):
            try:
                close_old_connections()
                if tick % beats_every == 0:
                    gate.heartbeat(me)
                    record_heartbeat(me, started)
                inflight.notice_lost_leases()
                sweeper.sweep()
            except Exception:
                log.exception("lease keeper tick failed; trying again next tick")
            tick += 1
        connection.close()


def record_heartbeat(holder: str, started) -> None:
    """Refresh this process's row, and whether its host has room for new cases."""
    global _pressure
    from testruns import resources
    from testruns.models import WorkerHeartbeat

    snapshot = resources.host_snapshot()
    _pressure = resources.host_pressure(snapshot)
    WorkerHeartbeat.objects.update_or_create(holder=holder, defaults={
        "hostname": socket.gethostname(), "pid": os.getpid(), "started_at": started,
        "last_seen": Now(), "cpu_percent": snapshot.cpu_percent,
        "memory_available_mb": snapshot.memory_available_mb,
        "load_average": snapshot.load_average[0],
        "accepting": _pressure is None, "note": _pressure or "",
    })
