"""Use cases, called the same way from views, the admin, the API, the CLI and actors."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Max
from django.db.models.functions import Now
from django.utils import timezone

from testruns.engine import gate
from testruns.live import events
from testruns.models import PromptCard, PromptVersion, Provider, TestCase, TestResult, TestRun

log = logging.getLogger(__name__)


# Serialises the admission check with the insert of the run it admits (launches only; the
# gate's semaphore rows are never taken while holding it, so it cannot deadlock with them).
ADMISSION_LOCK_KEY = 730_104_3


class LaunchError(Exception):
    pass


class QueueFull(LaunchError):
    """Admission control: the waiting queue is at MAX_QUEUE_LENGTH."""


def snapshot_version(card: PromptCard, *, author=None, note: str = "") -> PromptVersion:
    """Return the card's latest version, creating a new one if the prompt has changed."""
    latest = card.versions.order_by("-number").first()
    if latest and (latest.system_prompt, latest.template) == (card.system_prompt, card.template):
        return latest
    number = (card.versions.aggregate(n=Max("number"))["n"] or 0) + 1
    return PromptVersion.objects.create(
        card=card, number=number, system_prompt=card.system_prompt, template=card.template,
        author=author, change_note=note or ("Created" if number == 1 else ""),
    )


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

    1. Pin the version (the latest unless given), the cases (all enabled unless given) and
       the grader of llm-rubric assertions (the card's unless given; none means the run's
       own provider).
    2. Create the run and one pending result per case, in one transaction.
    3. After commit, try to admit it: with a free slot it starts at once; otherwise it
       waits in the queue until a release promotes it.
    """
    if not provider.enabled:
        raise LaunchError(f"Provider {provider.name} is disabled.")
    grader_provider = grader_provider or card.grader_provider
    if grader_provider is not None and not grader_provider.enabled:
        raise LaunchError(f"The grader provider {grader_provider.name} is disabled.")
    with transaction.atomic():
        check_queue_room()
        version = version or snapshot_version(card, author=user)
        if version.card_id != card.pk:
            raise LaunchError("That version belongs to another card.")
        cases = list(cases) if cases is not None else list(card.cases.filter(enabled=True))
        if not cases:
            raise LaunchError(f"{card.name} has no enabled test cases to run.")
        ensure_semaphores(provider)
        if grader_provider is not None:  # its 429s lower its ceiling (gate.throttle_provider)
            gate.ensure_semaphore(gate.provider_semaphore(grader_provider.pk),
                                  grader_provider.max_concurrency)
        run = TestRun.objects.create(
            card=card, version=version, provider=provider, launched_by=user,
            grader_provider=grader_provider, priority=priority, total_cases=len(cases),
            **config,
        )
        TestResult.objects.bulk_create(
            TestResult(run=run, case=case, position=i, case_name=case.name,
                       variables=case.variables, assertions=case.assertions,
                       threshold=case.threshold)
            for i, case in enumerate(cases)
        )
        events.announce(run.pk)
        events.publish_queue_changed()
        transaction.on_commit(gate.admit_runs)
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
        raise QueueFull(f"The queue is full: {waiting} runs are waiting and the limit is "
                        f"{limit}. Try again when some have started.")


def select_cases(card: PromptCard, *, case_ids: Sequence[int] | None = None,
                 tags: Sequence[str] | None = None) -> list[TestCase]:
    """The cases of `card` to run: the given ids (in case order; disabled ones too, since they
    were asked for by id), else its enabled cases with any of `tags`, else all enabled ones.
    Raises LaunchError for ids that are not the card's and when nothing is left to run."""
    if case_ids:
        wanted = set(case_ids)
        cases = list(card.cases.filter(pk__in=wanted))
        unknown = sorted(wanted - {case.pk for case in cases})
        if unknown:
            raise LaunchError(f"{card.name} has no test case with the id "
                              f"{', '.join(map(str, unknown))}.")
        return cases
    cases = card.cases.filter(enabled=True)
    if tags:
        cases = cases.filter(tags__overlap=list(tags))
        if not cases.exists():
            raise LaunchError(f"{card.name} has no enabled test case tagged "
                              f"{' or '.join(tags)}.")
    return list(cases)


def launch_runs(*, cards: Sequence[PromptCard], providers: Sequence[Provider], user=None,
                case_ids: Sequence[int] | None = None, tags: Sequence[str] | None = None,
                priority: int = 0, **config) -> list[TestRun]:
    """One run per (card, provider), all or none: a LaunchError (a disabled provider, no
    cases, a full queue) for any of them queues none. Runs of one batch share a
    comparison group, so reports can set them side by side."""
    group = uuid.uuid4() if len(cards) * len(providers) > 1 else None
    with transaction.atomic():
        return [
            launch_run(card=card, provider=provider, user=user, priority=priority,
                       cases=select_cases(card, case_ids=case_ids, tags=tags),
                       comparison_group=group, **config)
            for card in cards for provider in providers
        ]


def ensure_semaphores(provider: Provider) -> None:
    """The gate's rows start from settings and the provider; after that they are data."""
    gate.ensure_semaphore(gate.RUNS, settings.MAX_CONCURRENT_RUNS)
    gate.ensure_semaphore(gate.RUNS_PER_USER, settings.MAX_RUNS_PER_USER)
    gate.ensure_semaphore(gate.provider_semaphore(provider.pk), provider.max_concurrency)


def save_provider_limit(provider: Provider) -> None:
    """Keep the provider's call semaphore in step with its max_concurrency."""
    gate.ensure_semaphore(gate.provider_semaphore(provider.pk), provider.max_concurrency)
    gate.set_limit(gate.provider_semaphore(provider.pk), provider.max_concurrency)


def duplicate_card(card: PromptCard, *, user=None) -> PromptCard:
    """Copy a card with its test cases under a free "<slug>-copy[-N]" slug; history stays."""
    slug, n = f"{card.slug}-copy", 1
    while PromptCard.objects.filter(slug=slug).exists():
        n += 1
        slug = f"{card.slug}-copy-{n}"
    with transaction.atomic():
        copy = PromptCard.objects.create(
            name=f"{card.name} (copy)", slug=slug, description=card.description, tags=card.tags,
            owner=user or card.owner, system_prompt=card.system_prompt, template=card.template,
            grader_provider=card.grader_provider,
        )
        TestCase.objects.bulk_create(
            TestCase(card=copy, name=case.name, variables=case.variables,
                     assertions=case.assertions, threshold=case.threshold, tags=case.tags,
                     enabled=case.enabled, order=case.order)
            for case in card.cases.all()
        )
        snapshot_version(copy, author=user, note=f"Duplicated from {card.slug}")
    return copy


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
        locked.save(update_fields=["status", "phase", "cancel_requested", "finished_at",
                                   "done_count"])
        if was_running:
            gate.release_cases_of_run(locked.pk, locked.provider_id)
            gate.release_run(locked.pk)
        events.announce(run.pk)
        events.publish_queue_changed()
    log.info("run cancelled by %s", user, extra={"run_id": run.pk})
    return True
