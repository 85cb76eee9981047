"""The PostgreSQL semaphore against a simple model of what it must do.

These run the real gate functions on the real database, in one process; the cross-process
behaviour is in test_engine.py. Each rule below ends the way the product does: whatever
changed capacity also promoted waiters.
"""

from __future__ import annotations

import pytest
from django.db.models import Count, F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from testruns.engine import admission, gate, launching, limits, recording
from testruns.models import Lease, PromptCard, Provider, Semaphore, TestCase, TestResult, TestRun

pytestmark = pytest.mark.django_db


def run_slots() -> Semaphore:
    return Semaphore.objects.get(name=gate.RUNS)


def queue_order(runs):
    return sorted(runs, key=lambda r: (-r.priority, r.queued_at, r.pk))


class GateMachine(RuleBasedStateMachine):
    """Random launches, case admissions and completions, lease expiry, cancellation and
    limit changes. The model: the queue order, the limits, and who should hold a slot."""

    def __init__(self):
        super().__init__()
        for model in (Lease, TestResult, TestRun, TestCase, PromptCard, Provider, Semaphore):
            model.objects.all().delete()
        self.card = PromptCard.objects.create(name="c", slug="c", template="x {{ n }}")
        for i in range(3):
            TestCase.objects.create(card=self.card, name=f"case {i}", variables={"n": i})
        self.provider = Provider.objects.create(name="p", kind="simulator", max_concurrency=2)
        limits.ensure_semaphores(self.provider)
        limits.set_limit(gate.RUNS, 2)
        self.before()

    def provider_slots(self) -> Semaphore:
        return Semaphore.objects.get(name=gate.provider_semaphore(self.provider.pk))

    def before(self):
        """Remember what was held before a step: a step may not push above the limit, but
        a lowered limit does not evict holders."""
        self.in_use_before = run_slots().in_use
        self.calls_before = self.provider_slots().in_use

    def running(self):
        return list(TestRun.objects.filter(status="running"))

    # --- rules --------------------------------------------------------------------------

    @rule(priority=st.integers(0, 2), cases=st.integers(1, 3))
    def launch(self, priority, cases):
        self.before()
        waiting = list(TestRun.objects.filter(status="queued"))
        run = launching.launch_run(
            card=self.card,
            provider=self.provider,
            priority=priority,
            cases=list(self.card.cases.all()[:cases]),
            max_concurrent_tests=1 + cases % 2,
        )
        promoted = set(admission.admit_runs())  # what launch's on_commit does
        expected = queue_order(waiting + [TestRun.objects.get(pk=run.pk)])
        free = max(0, run_slots().limit - self.in_use_before)
        assert promoted == {r.pk for r in expected[:free]}

    @precondition(lambda self: TestRun.objects.filter(status="running").exists())
    @rule(data=st.data())
    def admit_and_claim_cases(self, data):
        self.before()
        admission.admit_cases(self.provider.pk)
        leases = list(Lease.objects.filter(result__isnull=False, holder=""))
        if leases:
            lease = data.draw(st.sampled_from(leases))
            assert gate.claim_case(lease.result_id, "worker-1") == lease.pk
            assert gate.claim_case(lease.result_id, "worker-2") is None  # a second delivery

    @precondition(lambda self: Lease.objects.filter(holder="worker-1").exists())
    @rule(data=st.data(), passed=st.booleans())
    def complete_case(self, data, passed):
        self.before()
        lease = data.draw(st.sampled_from(list(Lease.objects.filter(holder="worker-1"))))
        result = TestResult.objects.select_related("run").get(pk=lease.result_id)
        outcome = recording.CaseOutcome("passed" if passed else "failed", {"output": "x"})
        if recording.record_case(result.run, result, lease.pk, outcome):
            recording.finish_run(result.run_id)

    @precondition(lambda self: Lease.objects.filter(result__isnull=False).exists())
    @rule(data=st.data())
    def holder_dies(self, data):
        """A worker killed mid-case: its lease runs out and the sweeper takes it back."""
        self.before()
        lease = data.draw(st.sampled_from(list(Lease.objects.filter(result__isnull=False))))
        Lease.objects.filter(pk=lease.pk).update(expires_at=F("acquired_at"))
        assert admission.reclaim_expired_cases() >= 1
        assert TestResult.objects.get(pk=lease.result_id).status in {"pending", "running"}

    @precondition(lambda self: TestRun.objects.exclude(status__in=TestRun.FINISHED).exists())
    @rule(data=st.data())
    def cancel(self, data):
        self.before()
        run = data.draw(st.sampled_from(list(TestRun.objects.exclude(status__in=TestRun.FINISHED))))
        assert launching.cancel_run(run)
        run.refresh_from_db()
        assert run.status == "cancelled"
        assert not Lease.objects.filter(run=run).exists()

    @rule(limit=st.integers(0, 4))
    def change_run_limit(self, limit):
        self.before()
        limits.set_limit(gate.RUNS, limit)

    @rule(limit=st.integers(1, 3))
    def change_provider_limit(self, limit):
        self.before()
        limits.set_limit(gate.provider_semaphore(self.provider.pk), limit)

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def never_above_the_limit(self):
        slots = run_slots()
        # Lowering a limit does not evict holders; but nothing is ever admitted above it.
        assert slots.in_use <= max(slots.limit, self.in_use_before)
        provider = self.provider_slots()
        assert provider.in_use <= max(provider.limit, self.calls_before)
        case_leases = Lease.objects.filter(semaphore=provider)
        for run in TestRun.objects.filter(status="running"):
            assert case_leases.filter(run=run).count() <= run.max_concurrent_tests

    @invariant()
    def no_leaked_or_missing_lease(self):
        for semaphore in Semaphore.objects.annotate(n=Count("leases")):
            assert semaphore.in_use == semaphore.n, semaphore.name
        running = set(TestRun.objects.filter(status="running").values_list("pk", flat=True))
        slot_holders = list(
            Lease.objects.filter(semaphore__name=gate.RUNS).values_list("run_id", flat=True)
        )
        assert sorted(slot_holders) == sorted(running)
        in_flight = set(TestResult.objects.filter(status="running").values_list("pk", flat=True))
        leased = set(Lease.objects.filter(result__isnull=False).values_list("result_id", flat=True))
        assert leased == in_flight

    @invariant()
    def head_of_the_queue_is_never_starved(self):
        slots = run_slots()
        if slots.in_use < slots.limit:
            assert not TestRun.objects.filter(status="queued").exists()

    @invariant()
    def finished_runs_hold_nothing(self):
        assert not Lease.objects.filter(run__status__in=TestRun.FINISHED).exists()


def test_semaphore_matches_its_model_under_random_operations(db):
    run_state_machine_as_test(
        GateMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )


def test_release_promotes_the_next_waiter_in_the_same_transaction(make_card, simulator):
    gate.ensure_semaphore(gate.RUNS, 1)
    card = make_card()
    first = launching.launch_run(card=card, provider=simulator)
    second = launching.launch_run(card=card, provider=simulator)
    assert admission.admit_runs() == [first.pk]
    TestRun.objects.filter(pk=first.pk).update(done_count=F("total_cases"))
    assert recording.finish_run(first.pk)
    second.refresh_from_db()
    assert second.status == "running" and second.started_at is not None
    assert run_slots().in_use == 1


def test_per_user_limit_lets_another_users_run_pass(make_card, simulator, django_user_model):
    gate.ensure_semaphore(gate.RUNS, 3)
    gate.ensure_semaphore(gate.RUNS_PER_USER, 1)
    heavy = django_user_model.objects.create_user("heavy")
    light = django_user_model.objects.create_user("light")
    card = make_card()
    a = launching.launch_run(card=card, provider=simulator, user=heavy)
    b = launching.launch_run(card=card, provider=simulator, user=heavy, priority=5)
    c = launching.launch_run(card=card, provider=simulator, user=light)
    assert sorted(admission.admit_runs()) == sorted([b.pk, c.pk])
    assert TestRun.objects.get(pk=a.pk).status == "queued"


def test_a_raised_limit_promotes_waiters_at_once(make_card, simulator):
    gate.ensure_semaphore(gate.RUNS, 0)
    runs = [
        launching.launch_run(card=make_card(slug=f"c{i}"), provider=simulator) for i in range(3)
    ]
    assert admission.admit_runs() == []
    assert sorted(limits.set_limit(gate.RUNS, 2)) == [runs[0].pk, runs[1].pk]
