"""What every worker process does besides running cases: a heartbeat thread that keeps the
leases of the cases it is working on alive, a sweeper thread that repairs what others left
behind, a thread that launches due schedules (engine.scheduling; PostgreSQL decides which
process launches each due time), a thread for the follow-ups of closed cases
(engine.followups), and a hand-back of held cases at start (an earlier process with our host
and pid) and at shutdown.

Heartbeat and sweep run in separate threads so that a slow sweep (a broker or a channel
layer that takes seconds to answer) can never let a live worker's leases expire, which
would have its paid calls run a second time elsewhere.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import datetime

from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models.functions import Now
from django.utils import timezone

from testruns.engine import admission, gate, inflight, scheduling, sweeper, worker_identity
from testruns.engine.followups import followups
from testruns.models import WorkerHeartbeat
from testruns.ops import host_load

log = logging.getLogger(__name__)


class LeaseKeeping:
    def __init__(self, holder: str, host_and_pid: str, stopping: threading.Event) -> None:
        self.holder, self.host_and_pid, self.stopping = holder, host_and_pid, stopping
        self.started = timezone.now()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        """Hand back what an earlier process with our host and pid left, then keep leases
        alive and sweep, each in its own thread."""
        try:
            handed = admission.hand_back_earlier_holders(self.host_and_pid, self.holder)
            if handed:
                log.warning(
                    "handed back %d case(s) of an earlier process with this host and pid", handed
                )
        except Exception:  # the sweeper reclaims them after the TTL instead
            log.exception("handing back an earlier holder's cases failed")
        finally:
            connection.close()
        followups.start()
        self.threads = [
            threading.Thread(target=self.beat, name="lease-heartbeat", daemon=True),
            threading.Thread(target=self.sweep, name="lease-sweeper", daemon=True),
            threading.Thread(target=self.schedule, name="schedules", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        """Cases still held after the shutdown grace period go back to the queue now, so
        another worker takes them without waiting for the lease TTL."""
        for thread in self.threads:
            thread.join(timeout=5)
        followups.stop()
        try:
            handed = admission.hand_back(self.holder)
            if handed:
                log.warning("handed back %d unfinished case(s) on shutdown", handed)
            WorkerHeartbeat.objects.filter(holder=self.holder).delete()
        finally:
            connection.close()

    def beat(self) -> None:
        """Renew the leases of the cases in flight here every third of their TTL, and this
        process's heartbeat row."""
        every = float(settings.LEASE_TTL_SECONDS) / 3
        self._repeat(every, self._beat_once, what="heartbeat")

    def _beat_once(self) -> None:
        gate.heartbeat(self.holder, inflight.held_leases())
        record_heartbeat(self.holder, self.started)

    def sweep(self) -> None:
        """Stop waiting on cases whose lease is gone, and repair what crashes left behind."""
        self._repeat(float(settings.SWEEP_INTERVAL_SECONDS), self._sweep_once, what="sweep")

    @staticmethod
    def _sweep_once() -> None:
        inflight.notice_lost_leases()
        sweeper.sweep()

    def schedule(self) -> None:
        """Launch due schedules; apart from the sweep, so a slow sweep never makes a due
        time late."""
        every = float(settings.SCHEDULE_INTERVAL_SECONDS)
        self._repeat(every, scheduling.launch_due_schedules, what="schedule tick")

    def _repeat(self, interval: float, tick: Callable[[], None], *, what: str) -> None:
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


def record_heartbeat(holder: str, started: datetime) -> None:
    """Refresh this process's row, and whether its host has room for new cases."""
    snapshot = host_load.host_snapshot()
    pressure = host_load.host_pressure(snapshot)
    worker_identity.note_pressure(pressure)
    WorkerHeartbeat.objects.update_or_create(
        holder=holder,
        defaults={
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": started,
            "last_seen": Now(),
            "cpu_percent": snapshot.cpu_percent,
            "memory_available_mb": snapshot.memory_available_mb,
            "load_average": snapshot.load_average[0],
            "accepting": pressure is None,
            "note": pressure or "",
        },
    )
