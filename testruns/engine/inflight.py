"""Provider calls in flight in this worker process, so that a case whose lease is taken
away (its run was cancelled, or the lease expired and the case went to another worker)
stops being waited for: the worker thread is free again within a sweep interval, while
the abandoned call runs out on its own timeout in a helper thread. A call that outlives its
deadline is not waited for either.

Also the leases this process gave up on: a case whose outcome could not be written (the
database was gone for longer than the retries) must not stay held by this process, whose
heartbeat would renew it forever. Such a lease is handed to the sweeper (holder '', expired)
as soon as the database answers again; `notice_lost_leases`, which the sweep thread calls
every tick, does that first.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TypeVar

from django.db.models.functions import Now

from testruns.models import Lease

T = TypeVar("T")

log = logging.getLogger(__name__)

_watched: dict[int, threading.Event] = {}
_forsaken: set[int] = set()
_held: dict[int, int] = {}
_lock = threading.Lock()


class CaseAbandoned(Exception):
    """The case's lease is gone; its outcome would be thrown away."""


class CallOverran(TimeoutError):
    """The call did not return by its deadline; it goes on in its helper thread, unwaited."""


@contextmanager
def watching(lease_id: int) -> Iterator[threading.Event]:
    """Register a case in flight; yields the event that is set when its lease disappears."""
    lost = threading.Event()
    with _lock:
        _watched[lease_id] = lost
    try:
        yield lost
    finally:
        with _lock:
            _watched.pop(lease_id, None)


@contextmanager
def holding(lease_id: int) -> Iterator[None]:
    """From claim to recorded result: the heartbeat renews this lease while the block runs.
    A lease this process holds outside such a block (a case kept for a thread that died
    before it started it) is left to expire, and the sweeper gives its case to another."""
    with _lock:
        _held[lease_id] = _held.get(lease_id, 0) + 1
    try:
        yield
    finally:
        with _lock:
            _held[lease_id] -= 1
            if not _held[lease_id]:
                del _held[lease_id]


def held_leases() -> list[int]:
    """The leases of the cases this process is working on, for the heartbeat."""
    with _lock:
        return sorted(set(_held) | set(_watched))


def notice_lost_leases() -> int:
    """One query for every case in flight here: wake those whose lease no longer exists.
    First, hand the leases this process gave up on to the sweeper (see release_forsaken)."""
    release_forsaken()
    with _lock:
        watched = dict(_watched)
    if not watched:
        return 0
    alive = set(Lease.objects.filter(pk__in=watched).values_list("pk", flat=True))
    lost = [event for lease_id, event in watched.items() if lease_id not in alive]
    for event in lost:
        event.set()
    return len(lost)


def forsake_later(lease_id: int) -> None:
    """Remember a case lease to hand to the sweeper once the database answers again."""
    with _lock:
        _forsaken.add(lease_id)


def forsaken() -> set[int]:
    """Lease ids this process gave up on and could not yet hand over (a heartbeat may skip
    them: renewing them only delays their reclaim)."""
    with _lock:
        return set(_forsaken)


def release_forsaken() -> int:
    """Hand the given-up leases to the sweeper: no holder (the heartbeat no longer renews
    them) and expired (the next sweep requeues their cases). Never raises: with the
    database still away they stay for the next tick. Returns how many were handed over."""
    ids = forsaken()
    if not ids:
        return 0
    try:
        released = Lease.objects.filter(pk__in=ids, result__isnull=False).update(
            holder="", expires_at=Now()
        )
    except Exception:  # still unreachable: try again next tick
        log.warning("%d given-up case lease(s) still cannot be handed back", len(ids))
        return 0
    with _lock:
        _forsaken.difference_update(ids)
    if released:
        log.warning("handed %d given-up case lease(s) to the sweeper", released)
    return released


def call(fn: Callable[[], T], lost: threading.Event | None, timeout: float | None = None) -> T:
    """Run fn() in a helper thread and wait for it, unless the lease is lost first (raises
    CaseAbandoned) or `timeout` seconds pass (raises CallOverran). With neither to watch for,
    fn() runs here."""
    if lost is None and timeout is None:
        return fn()
    future: Future = Future()
    lost_or_done = threading.Event()
    context = contextvars.copy_context()  # the run and case ids its log lines carry

    def job() -> None:
        try:
            future.set_result(context.run(fn))
        except BaseException as exc:  # handed to the waiting thread as it is
            future.set_exception(exc)
        finally:
            lost_or_done.set()

    _helpers.run(job)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not lost_or_done.wait(0.1):
        if lost is not None and lost.is_set():
            raise CaseAbandoned
        if deadline is not None and time.monotonic() >= deadline:
            raise CallOverran(f"no answer after {timeout:.1f}s")
    return future.result()


class HelperThreads:
    """Daemon threads that run provider calls, kept between calls: starting a thread for
    each call cost more CPU than a fast call itself. A call that is abandoned keeps its
    thread until it runs out on its own timeout; the next call gets another thread. Daemon,
    unlike concurrent.futures' workers, so a hung call never holds up the process's exit."""

    def __init__(self, keep_idle: int = 64):
        self.keep_idle = keep_idle
        self.idle: list[queue.SimpleQueue] = []
        self.lock = threading.Lock()

    def run(self, job: Callable[[], None]) -> None:
        with self.lock:
            inbox = self.idle.pop() if self.idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(
                target=self._serve, args=(inbox,), name="provider-call", daemon=True
            ).start()
        inbox.put(job)

    def _serve(self, inbox: queue.SimpleQueue) -> None:
        while True:
            inbox.get()()
            with self.lock:
                if len(self.idle) >= self.keep_idle:
                    return
                self.idle.append(inbox)


_helpers = HelperThreads()


def wait(seconds: float, lost: threading.Event | None) -> None:
    """Sleep between retries, cut short when the lease is lost."""
    if lost is None:
        threading.Event().wait(seconds)
    elif lost.wait(seconds):
        raise CaseAbandoned
