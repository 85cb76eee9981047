"""Provider calls in flight in this worker process, so that a case whose lease is taken
away (its run was cancelled, or the lease expired and the case went to another worker)
stops being waited for: the worker thread is free again within a sweep interval, while
the abandoned call runs out on its own timeout in a helper thread."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TypeVar

from testruns.models import Lease

T = TypeVar("T")

_watched: dict[int, threading.Event] = {}
_lock = threading.Lock()


class CaseAbandoned(Exception):
    """The case's lease is gone; its outcome would be thrown away."""


@contextmanager
def watching(lease_id: int):
    """Register a case in flight; yields the event that is set when its lease disappears."""
    lost = threading.Event()
    with _lock:
        _watched[lease_id] = lost
    try:
        yield lost
    finally:
        with _lock:
            _watched.pop(lease_id, None)


def notice_lost_leases() -> int:
    """One query for every case in flight here: wake those whose lease no longer exists."""
    with _lock:
        watched = dict(_watched)
    if not watched:
        return 0
    alive = set(Lease.objects.filter(pk__in=watched).values_list("pk", flat=True))
    lost = [event for lease_id, event in watched.items() if lease_id not in alive]
    for event in lost:
        event.set()
    return len(lost)


def call(fn: Callable[[], T], lost: threading.Event | None) -> T:
    """Run fn() in a helper thread and wait for it, unless the lease is lost first."""
    if lost is None:
        return fn()
    future: Future = Future()

    def target() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the waiting thread as it is
            future.set_exception(exc)
        finally:
            lost_or_done.set()

    lost_or_done = threading.Event()
    context = contextvars.copy_context()  # the run and case ids its log lines carry
    threading.Thread(target=context.run, args=(target,), name="provider-call",
                     daemon=True).start()
    while not lost_or_done.wait(0.1):
        if lost.is_set():
            raise CaseAbandoned
    return future.result()


def wait(seconds: float, lost: threading.Event | None) -> None:
    """Sleep between retries, cut short when the lease is lost."""
    if lost is None:
        threading.Event().wait(seconds)
    elif lost.wait(seconds):
        raise CaseAbandoned
