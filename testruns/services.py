"""Use cases, called the same way from views, the admin, the API, the CLI and actors."""

from __future__ import annotations

import logging

from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from testruns import events
from testruns.models import PromptCard, PromptVersion, Provider, TestCase, TestResult, TestRun

log = logging.getLogger(__name__)


class LaunchError(Exception):
    pass


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
    **config,
) -> TestRun:
    """Queue a run of `card` against `provider`.

    1. Pin the version (the latest unless given) and the cases (all enabled unless given).
    2. Create the run and one pending result per case, in one transaction.
    3. After commit, hand the run to the workers and tell queue watchers.
    """
    if not provider.enabled:
        raise LaunchError(f"Provider {provider.name} is disabled.")
    with transaction.atomic():
        version = version or snapshot_version(card, author=user)
        if version.card_id != card.pk:
            raise LaunchError("That version belongs to another card.")
        cases = list(cases) if cases is not None else list(card.cases.filter(enabled=True))
        if not cases:
            raise LaunchError(f"{card.name} has no enabled test cases to run.")
        run = TestRun.objects.create(
            card=card, version=version, provider=provider, launched_by=user,
            priority=priority, total_cases=len(cases), **config,
        )
        TestResult.objects.bulk_create(
            TestResult(run=run, case=case, position=i, case_name=case.name,
                       variables=case.variables, assertions=case.assertions,
                       threshold=case.threshold)
            for i, case in enumerate(cases)
        )
        events.record_run_event(run.pk, "status", {"status": run.status})
        events.publish_queue_changed()
        transaction.on_commit(lambda: dispatch_run(run.pk))
    log.info("run queued", extra={"run_id": run.pk})
    return run


def dispatch_run(run_id: int) -> bool:
    """Send the run's message to the broker. If the broker is down the run stays queued with
    no dispatched_at, and the sweeper sends it once the broker is back."""
    from testruns.actors import execute_run

    try:
        execute_run.send(run_id)
    except Exception:
        log.warning("could not dispatch run %s; the sweeper will retry", run_id, exc_info=True)
        return False
    TestRun.objects.filter(pk=run_id, dispatched_at=None).update(dispatched_at=timezone.now())
    return True
