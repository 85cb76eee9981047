"""Admission: the gate's answers turned into what follows them. Every change of capacity goes
through here: it calls the gate (SQL, in the caller's transaction) and, for what the gate
admitted, tells the pages and sends the messages after commit. A rolled-back transaction
admitted nothing, so it announces and sends nothing.

A promoted run is announced to its page and to the queue watchers, and its first cases are
admitted once it commits. An admitted case is sent to the workers through the broker,
unless it was kept for the worker thread that freed its slot (the hand-over: that thread
runs it next, saving a broker round trip).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import transaction

from testruns.engine import dispatch, gate
from testruns.engine.gate import Admitted, LeaseFilter
from testruns.live import publish

log = logging.getLogger(__name__)


# --- Runs ----------------------------------------------------------------------------------


def admit_runs() -> list[int]:
    """Promote the head of the run queue into free run slots; returns the promoted run ids."""
    with transaction.atomic():
        return _announce_runs(gate.admit_runs())


def release_run(run_id: int) -> list[int]:
    """Inside the caller's transaction, after it locked "runs": give back the run's slot and
    promote the next runs."""
    return _announce_runs(gate.release_run(run_id))


def finish_run(run_id: int) -> str | None:
    """Inside the caller's transaction: close a running run whose cases are all done, hand
    its slot to the next runs and announce both. Returns its final status, or None if it was
    not a running run all done."""
    finished = gate.finish_run(run_id)
    if finished.status:
        publish.announce(run_id)
        _announce_runs(finished.promoted)
    return finished.status


def _announce_runs(
    promoted: list[gate.PromotedRun], *, admitted_on: int | None = None
) -> list[int]:
    """Tell the pages of promoted runs, and admit their first cases after commit, except on
    the provider `admitted_on`, whose free slots the promoting call already filled."""
    for run_id, provider_id in promoted:
        publish.announce(run_id)
        if provider_id != admitted_on:
            transaction.on_commit(lambda p=provider_id: admit_cases(p))
    if promoted:
        publish.publish_queue_changed()
    return [run.run_id for run in promoted]


# --- Cases ---------------------------------------------------------------------------------


_handover = threading.local()


@contextmanager
def handing_over_to(holder: str | None) -> Iterator[list[Admitted]]:
    """Within this block, the first case admitted is kept for `holder` instead of being sent
    through the broker: the worker thread that freed a slot runs the next case itself, so a
    hand-over costs no broker round trip. Yields the list that receives it, filled once the
    admitting transaction commits."""
    _handover.holder, _handover.taken, _handover.promised = holder, [], False
    try:
        yield _handover.taken
    finally:
        _handover.holder = None


def _keeper() -> str:
    """Who the next admission may keep a case for: this thread while it hands over, and only
    one case per block (a second would wait behind the first with its slot held)."""
    holder = getattr(_handover, "holder", None)
    if not holder or _handover.taken or _handover.promised:
        return ""
    return holder


def admit_cases(provider_id: int) -> list[Admitted]:
    """Promote pending cases on this provider into its free call slots, and send them."""
    with transaction.atomic():
        return _send(gate.admit_cases_locked(provider_id, keeper=_keeper()))


def close_case(**closing) -> gate.Closed:
    """A finished case in one round trip (gate.close_case, keyword arguments as there): its
    slot given back, its outcome written, and the case promoted into the slot kept for this
    thread while it hands over; any other admitted case is sent."""
    closed = gate.close_case(**closing, keeper=_keeper())
    _send(closed.admitted)
    return closed


def announce_finished(run_id: int, provider_id: int, promoted: list[gate.PromotedRun]) -> None:
    """After close_case finished a run: tell its page, and the pages of the runs promoted
    into its slot (whose first cases on `provider_id` close_case already admitted)."""
    with transaction.atomic():
        publish.announce(run_id)
        _announce_runs(promoted, admitted_on=provider_id)


def admit_next_cases(provider_id: int, locked: tuple) -> list[Admitted]:
    """The last step of a case's hand-back (after gate.give_back_case, whose row `locked`
    is): promote waiting cases into the freed slot."""
    return _send(gate.admit_cases_locked(provider_id, locked, keeper=_keeper()))


def release_cases_of_run(run_id: int, provider_id: int) -> list[Admitted]:
    """Cancel: inside the caller's transaction, after it locked the provider's row."""
    return _send(gate.release_cases_of_run(run_id, provider_id))


def _send(admitted: list[Admitted]) -> list[Admitted]:
    """After commit: the kept case to its thread, the others to the broker."""
    kept = [a for a in admitted if a.holder]
    to_send = [a.result_id for a in admitted if not a.holder]
    if kept:
        _handover.promised = True
        transaction.on_commit(lambda: _handover.taken.extend(kept))
    if to_send:
        transaction.on_commit(lambda: dispatch.send_cases(to_send))
    return admitted


# --- Limits and liveness -------------------------------------------------------------------


def set_limit(name: str, limit: int) -> list[int]:
    """Change a limit; raising it promotes waiters at once. Returns promoted run ids."""
    gate.set_limit(name, limit)
    if name in (gate.RUNS, gate.RUNS_PER_USER):
        return admit_runs()
    if name.startswith("provider:"):
        admit_cases(int(name.split(":", 1)[1]))
    return []


def _requeue(which: LeaseFilter) -> int:
    requeued = 0
    for count, admitted in gate.requeue_cases(which):
        requeued += count
        _send(admitted)
    return requeued


def reclaim_expired_cases() -> int:
    """Sweep case leases whose holder stopped heartbeating (killed worker, lost message):
    put their cases back to pending and refill the slots. Returns how many were reclaimed."""
    reclaimed = _requeue(gate.EXPIRED)
    if reclaimed:
        log.warning("reclaimed %d expired case lease(s)", reclaimed)
    return reclaimed


def hand_back(holder: str) -> int:
    """A worker shutting down returns the cases it still holds to the queue at once, instead
    of letting them wait for the lease TTL."""
    return _requeue(gate.held_by(holder))


def hand_back_earlier_holders(host_and_pid: str, holder: str) -> int:
    """A worker starting with the host name and pid of a dead one returns that one's leases
    at once: they were never going to be finished."""
    return _requeue(gate.held_by_earlier_process(host_and_pid, holder))
