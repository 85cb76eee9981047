"""Launching and cancelling runs: the one way every entry point (pages, admin actions, API,
CLI, schedules) queues or cancels work. Admission happens after commit, through the gate."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from django.conf import settings
from django.db import connection, transaction
from django.db.models.functions import Now
from django.utils import timezone

from testruns.catalog.cards import snapshot_version
from testruns.engine import admission, gate
from testruns.engine.limits import ensure_semaphores
from testruns.engine.run_settings import check_settings
from testruns.live import publish
from testruns.models import (
    ADMISSION_LOCK_KEY,
    PromptCard,
    PromptVersion,
    Provider,
    TestCase,
    TestResult,
    TestRun,
)

log = logging.getLogger(__name__)


class LaunchError(Exception):
    """A launch refused as a whole. `field` names the launch_runs argument at fault (None:
    the launch as a whole), so an entry point can show the message beside its own input."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class QueueFull(LaunchError):
    """Admission control: the waiting queue is at MAX_QUEUE_LENGTH."""


def launch_run(
    *,
    card: PromptCard,
    provider: Provider,
    user=None,
    cases: list[TestCase] | None = None,
    version: PromptVersion | None = None,
    priority: int = 0,
    grader_provider: Provider | None = None,
    **config,
) -> TestRun:
    """Queue a run of `card` against `provider`.

    Entry points call launch_runs, which calls this once per (card, provider).
    1. Check the settings against the bounds on TestRun's fields (the entry points have,
       with the same messages; this is for every other caller).
    2. Pin the version (the latest unless given), the cases (all enabled unless given) and
       the grader of llm-rubric assertions (the card's unless given; none means the run's
       own provider).
    3. Create the run and one pending result per case, in one transaction.
    4. After commit, try to admit it: with a free slot it starts at once; otherwise it
       waits in the queue until a release promotes it.
    """
    check_settings({"priority": priority, **config})
    if not provider.enabled:
        raise LaunchError(f"Provider {provider.name} is disabled.", field="providers")
    grader_provider = grader_provider or card.grader_provider
    if grader_provider is not None and not grader_provider.enabled:
        raise LaunchError(
            f"The grader provider {grader_provider.name} is disabled.", field="grader_provider"
        )
    with transaction.atomic():
        check_queue_room()
        version = version or snapshot_version(card, author=user)
        if version.card_id != card.pk:
            raise LaunchError("That version belongs to another card.", field="version")
        cases = list(cases) if cases is not None else list(card.cases.filter(enabled=True))
        if not cases:
            raise LaunchError(f"{card.name} has no enabled test cases to run.")
        ensure_semaphores(provider)
        if grader_provider is not None:  # its 429s lower its ceiling (gate.throttle_provider)
            gate.ensure_semaphore(
                gate.provider_semaphore(grader_provider.pk), grader_provider.max_concurrency
            )
        run = TestRun.objects.create(
            card=card,
            version=version,
            provider=provider,
            launched_by=user,
            grader_provider=grader_provider,
            priority=priority,
            total_cases=len(cases),
            **config,
        )
        TestResult.objects.bulk_create(
            TestResult(
                run=run,
                case=case,
                position=i,
                case_name=case.name,
                variables=case.variables,
                assertions=case.assertions,
                threshold=case.threshold,
            )
            for i, case in enumerate(cases)
        )
        publish.announce(run.pk)
        publish.publish_queue_changed()
        transaction.on_commit(admission.admit_runs)
    log.info("run queued", extra={"run_id": run.pk})
    return run


def check_queue_room() -> None:
    """Inside the launch's transaction: refuse a new run while MAX_QUEUE_LENGTH runs wait, so
    the queue cannot grow without bound. The advisory lock (held until commit) makes the count
    and the insert one step for concurrent launches."""
    limit = settings.MAX_QUEUE_LENGTH
    if not limit:
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [ADMISSION_LOCK_KEY])
        cursor.execute("SELECT count(*) FROM testruns_testrun WHERE status = 'queued'")
        waiting = cursor.fetchone()[0]
    if waiting >= limit:
        raise QueueFull(
            f"The queue is full: {waiting} runs are waiting and the limit is "
            f"{limit}. Try again when some have started."
        )


def select_cases(
    card: PromptCard, *, case_ids: Sequence[int] | None = None, tags: Sequence[str] | None = None
) -> list[TestCase]:
    """The cases of `card` to run: the given ids (in case order; disabled ones too, since they
    were asked for by id), else its enabled cases with any of `tags`, else all enabled ones.
    Raises LaunchError for ids that are not the card's and when nothing is left to run."""
    if case_ids:
        wanted = set(case_ids)
        cases = list(card.cases.filter(pk__in=wanted))
        unknown = sorted(wanted - {case.pk for case in cases})
        if unknown:
            raise LaunchError(
                f"{card.name} has no test case with the id {', '.join(map(str, unknown))}.",
                field="case_ids",
            )
        return cases
    cases = card.cases.filter(enabled=True)
    if tags:
        cases = cases.filter(tags__overlap=list(tags))
        if not cases.exists():
            raise LaunchError(
                f"{card.name} has no enabled test case tagged {' or '.join(tags)}.", field="tags"
            )
    return list(cases)


def find_version(card: PromptCard, number: int) -> PromptVersion:
    """The card's version `number` (as pages and reports show it: v1, v2, ...)."""
    version = card.versions.filter(number=number).first()
    if version is None:
        raise LaunchError(f"{card.name} has no version {number}.", field="version")
    return version


def launch_runs(
    *,
    cards: Sequence[PromptCard],
    providers: Sequence[Provider],
    user=None,
    version: int | None = None,
    case_ids: Sequence[int] | None = None,
    tags: Sequence[str] | None = None,
    priority: int = 0,
    **config,
) -> list[TestRun]:
    """The launch every entry point (page, admin action, API, CLI) calls: one run per
    (card, provider), all or none.

    1. Check what does not depend on the database's state first: the settings' bounds,
       that every provider is enabled, that cases are chosen by ids or by tags (not both)
       and that ids and a version number come with one card.
    2. In one transaction, per card: pin the version (number `version`, else the latest),
       choose the cases (`case_ids`, else the enabled ones with any of `tags`, else all
       enabled ones), and queue a run per provider.
    A LaunchError (a disabled provider, an unknown version or case, no cases, a full queue)
    for any of them queues none. Several runs share a comparison group, so reports can set
    them side by side; `config` is the rest of the run's settings (see TestRun).
    """
    if not cards or not providers:
        raise LaunchError("Choose at least one card and one provider.")
    check_settings({"priority": priority, **config})
    for provider in providers:
        if not provider.enabled:
            raise LaunchError(f"Provider {provider.name} is disabled.", field="providers")
    if case_ids and tags:
        raise LaunchError("Choose the cases by id or by tag, not both.", field="tags")
    if case_ids and len(cards) != 1:
        raise LaunchError(
            "Test case ids belong to one card; use tags for several cards.", field="case_ids"
        )
    if version is not None and len(cards) != 1:
        raise LaunchError(
            "A version number belongs to one card: launch one card to choose its version.",
            field="version",
        )
    group = uuid.uuid4() if len(cards) * len(providers) > 1 else None
    runs = []
    with transaction.atomic():
        for card in cards:
            pinned = find_version(card, version) if version is not None else None
            cases = select_cases(card, case_ids=case_ids, tags=tags)
            runs.extend(
                launch_run(
                    card=card,
                    provider=provider,
                    user=user,
                    cases=cases,
                    version=pinned,
                    priority=priority,
                    comparison_group=group,
                    **config,
                )
                for provider in providers
            )
    return runs


def cancel_run(run: TestRun, *, user=None) -> bool:
    """Cancel a run that has not finished; results so far are kept.

    In one transaction (semaphore rows first, in name order: provider, then runs):
    1. Mark the run cancelled and its pending and in-flight cases skipped.
    2. If it was running, drop its case leases and its run slot, and promote waiters into
       them at once. A worker still calling the provider for it finds its result no longer
       running and throws the answer away.
    """
    with transaction.atomic():
        gate.lock_provider(run.provider_id)
        gate.lock_runs()
        locked = TestRun.objects.select_for_update().get(pk=run.pk)
        if locked.is_finished:
            return False
        was_running = locked.status == TestRun.Status.RUNNING
        skipped = TestResult.objects.filter(
            run=locked, status__in=[TestResult.Status.PENDING, TestResult.Status.RUNNING]
        ).update(status=TestResult.Status.SKIPPED, finished_at=timezone.now())
        locked.status, locked.phase = TestRun.Status.CANCELLED, TestRun.Phase.DONE
        locked.cancel_requested, locked.finished_at = True, Now()
        locked.done_count += skipped
        locked.save(
            update_fields=["status", "phase", "cancel_requested", "finished_at", "done_count"]
        )
        if was_running:
            admission.release_cases_of_run(locked.pk, locked.provider_id)
            admission.release_run(locked.pk)
        publish.announce(run.pk)
        publish.publish_queue_changed()
    log.info("run cancelled by %s", user, extra={"run_id": run.pk})
    return True
