"""The gate's hot path: a finished case, and a run's last case, hand their slots on in one
call to the database (pcr_close_case); what a worker leaves for later does not hold up the
next case (follow-ups); provider calls reuse their helper threads."""

from __future__ import annotations

import threading

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from testruns.engine import admission, gate, inflight, launching, limits, recording
from testruns.engine.followups import Followups, followups
from testruns.models import Lease, Semaphore, TestResult, TestRun
from tests.conftest import wait_for


def claim_admitted(run: TestRun, holder: str) -> tuple[TestResult, int]:
    result = TestResult.objects.select_related("run").get(run=run, status="running")
    return result, gate.claim_case(result.pk, holder)


@pytest.mark.django_db(transaction=True)
def test_a_runs_last_case_hands_the_run_slot_to_the_next_run_in_one_call(simulator, make_card):
    limits.ensure_semaphores(simulator)
    limits.set_limit(gate.RUNS, 1)
    card = make_card(cases=1)
    first = launching.launch_run(card=card, provider=simulator)
    second = launching.launch_run(card=card, provider=simulator)
    assert TestRun.objects.get(pk=second.pk).status == "queued"
    result, lease_id = claim_admitted(first, "t:1")
    outcome = recording.CaseOutcome("passed", {"output": "hi", "latency_ms": 3.0})

    followups.start()  # as in a worker: telling pages waits for no one
    try:
        with (
            admission.handing_over_to("t:1") as taken,
            CaptureQueriesContext(connection) as queries,
        ):
            needs_finishing = recording.record_case(result.run, result, lease_id, outcome)
    finally:
        followups.stop()

    assert [q["sql"].lstrip().split("(")[0] for q in queries] == [
        "SELECT held, written, complete, event_due, admitted, finished, promoted FROM "
        "pcr_close_case"
    ]
    assert not needs_finishing
    first.refresh_from_db()
    assert (first.status, first.phase, first.passed_count) == ("succeeded", "done", 1)
    assert TestResult.objects.get(pk=result.pk).output == "hi"
    # The next run took the slot, and its first case was kept for the thread that freed it.
    assert TestRun.objects.get(pk=second.pk).status == "running"
    (kept,) = taken
    assert (kept.run_id, kept.holder) == (second.pk, "t:1")
    assert Lease.objects.get(pk=kept.lease_id).holder == "t:1"
    for semaphore in Semaphore.objects.all():
        assert semaphore.in_use == semaphore.leases.count(), semaphore.name
    assert first.event_seq > 0  # the follow-ups told its page before stop() returned


@pytest.mark.django_db
def test_a_case_closed_after_its_lease_was_taken_back_writes_nothing(simulator, make_card):
    run = launching.launch_run(card=make_card(cases=2), provider=simulator, max_concurrent_tests=1)
    admission.admit_runs()
    admission.admit_cases(simulator.pk)  # what admit_runs' on_commit does
    result, lease_id = claim_admitted(run, "t:1")
    Lease.objects.filter(pk=lease_id).update(expires_at=Lease.objects.get(pk=lease_id).acquired_at)
    assert admission.reclaim_expired_cases() == 1  # the sweeper took it back

    outcome = recording.CaseOutcome("passed", {"output": "late"})
    assert not recording.record_case(result.run, result, lease_id, outcome)

    result.refresh_from_db()
    run.refresh_from_db()
    assert result.output == "" and run.done_count == 0
    for semaphore in Semaphore.objects.all():
        assert semaphore.in_use == semaphore.leases.count(), semaphore.name


def test_an_outcome_naming_a_column_the_gate_does_not_write_is_refused():
    with pytest.raises(ValueError, match="not outcome columns of a result: \\['secret'\\]"):
        gate.close_case(
            lease_id=1,
            result_id=1,
            run_id=1,
            provider_id=1,
            status="passed",
            fields={"output": "x", "secret": "y"},
            succeeded=True,
            skip_rest=False,
            event_interval=0.25,
        )


def test_follow_ups_run_in_order_in_their_own_thread_and_drain_on_stop():
    ran: list[tuple[int, str]] = []
    later = Followups()
    later.later(lambda: ran.append((0, threading.current_thread().name)))  # not started: now
    assert ran == [(0, threading.current_thread().name)]

    later.start()
    for n in range(1, 51):
        later.later(lambda n=n: ran.append((n, threading.current_thread().name)))
    later.later(lambda: 1 / 0)  # a failing follow-up does not stop the ones after it
    later.later(lambda: ran.append((51, threading.current_thread().name)))
    later.stop()
    assert [n for n, _ in ran] == list(range(52))
    assert {name for _, name in ran[1:]} == {"followups"}


def test_provider_calls_reuse_helper_threads_and_a_hung_call_keeps_its_own():
    helpers = inflight.HelperThreads()
    seen: list[int] = []
    helpers.run(lambda: seen.append(threading.get_ident()))
    wait_for(lambda: helpers.idle, what="the helper to be idle again")
    helpers.run(lambda: seen.append(threading.get_ident()))
    wait_for(lambda: len(seen) == 2 and helpers.idle, what="the second call")
    assert seen[0] == seen[1]

    release = threading.Event()
    helpers.run(release.wait)  # hangs until released: its thread is not idle
    helpers.run(lambda: seen.append(threading.get_ident()))
    wait_for(lambda: len(seen) == 3, what="a call while another hangs")
    assert seen[2] != seen[0]
    release.set()
    wait_for(lambda: len(helpers.idle) == 2, what="both helpers to be idle")
