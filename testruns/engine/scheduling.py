"""Schedules: saving one (its next due time by the database's clock) and launching the due
ones, from a thread of every worker process (lease_keeping). There is no scheduler process:
PostgreSQL decides which process launches a due time, as it decides who gets a slot.

A tick takes one due schedule at a time with `SELECT ... FOR UPDATE SKIP LOCKED` and, in the
same transaction, records the due time (unique per schedule and due time), launches through
launching.launch_runs (the same service and gate as every other entry point) and moves the
schedule's next due time past now. Another process either skips the locked row or, once it is
committed, no longer finds it due; so each due time is launched once, however many processes
and hosts tick. Due times that passed while nothing ticked (every worker down) are covered by
one launch when a worker is back, not one per missed tick.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from django.core.exceptions import ValidationError
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.db.models import F, Q, QuerySet
from django.db.models.functions import Now

from testruns.catalog import cron
from testruns.engine import counters, launching, worker_identity
from testruns.models import PromptCard, Provider, Schedule, ScheduleLaunch, TestRun

if TYPE_CHECKING:  # only for annotations
    from django.contrib.auth.models import AbstractBaseUser

log = logging.getLogger(__name__)

# Due schedules one tick launches at most; the rest wait for the next tick (a second later).
TICK_BATCH = 20


def database_now() -> datetime:
    """now() of the current transaction: every host agrees on it, whatever their clocks say."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        return cursor.fetchone()[0]


def save_schedule(schedule: Schedule, *, providers: Sequence[Provider] | None = None) -> Schedule:
    """Save a (validated) schedule and plan its next due time from now, by the database's
    clock: a new, edited or resumed schedule starts from the next due time, and a paused one
    has none (so resuming launches nothing for the time it was paused)."""
    with transaction.atomic():
        schedule.next_due_at = (
            None
            if schedule.paused
            else cron.next_after(schedule.cron, schedule.time_zone, database_now())
        )
        schedule.save()
        if providers is not None:
            schedule.providers.set(providers)
    return schedule


def set_paused(schedule: Schedule, paused: bool) -> Schedule:
    schedule.paused = paused
    return save_schedule(schedule)


def launch_due_schedules(limit: int = TICK_BATCH) -> int:
    """A tick: launch every due schedule (up to `limit`). Returns how many due times were
    launched or refused."""
    handled = 0
    while handled < limit and (launch := launch_next_due()) is not None:
        handled += launch is not False
    return handled


def launch_next_due() -> ScheduleLaunch | bool | None:
    """Take one due schedule no other process holds and launch it.

    1. Lock the most overdue schedule that is not paused (skipping rows others hold).
    2. One without a next due time (saved outside save_schedule) only gets one planned.
    3. Record the latest due time that has passed, and how many earlier ones it covers.
    4. Launch its runs (in a savepoint: a refused launch is recorded, not retried).
    5. Plan the next due time after now.
    Returns the launch, False when a due time was only planned, None when nothing is due."""
    with transaction.atomic():
        schedule = (
            Schedule.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(paused=False)
            .filter(Q(next_due_at__lte=Now()) | Q(next_due_at=None))
            .order_by(F("next_due_at").asc(nulls_first=True), "pk")
            .first()
        )
        if schedule is None:
            return None
        now = database_now()
        due = schedule.next_due_at
        schedule.next_due_at = cron.next_after(schedule.cron, schedule.time_zone, now)
        schedule.save(update_fields=["next_due_at"])
        if due is None:
            return False
        latest = max(due, cron.latest_at_or_before(schedule.cron, schedule.time_zone, now))
        launch = _record(
            schedule,
            latest,
            now,
            cron.due_times_between(schedule.cron, schedule.time_zone, due, latest) - 1,
        )
        if launch is None:
            return False
        _launch(schedule, launch)
    return launch


def _record(
    schedule: Schedule, due_at: datetime, now: datetime, missed: int
) -> ScheduleLaunch | None:
    """The due time's row; None if it exists already (a launch that raced us, which the lock
    makes impossible; the unique row is the second guard)."""
    try:
        with transaction.atomic():
            return ScheduleLaunch.objects.create(
                schedule=schedule,
                due_at=due_at,
                launched_at=now,
                missed=max(0, missed),
                worker=worker_identity.holder_id(),
            )
    except IntegrityError:
        log.warning("schedule %s: due time %s was launched already", schedule.pk, due_at)
        return None


def _launch(schedule: Schedule, launch: ScheduleLaunch) -> list[TestRun]:
    runs: list[TestRun] = []
    try:
        with transaction.atomic():
            runs = launching.launch_runs(
                cards=cards_of(schedule),
                providers=list(schedule.providers.order_by("name")),
                user=launcher_of(schedule),
                schedule_launch=launch,
                **schedule.run_options(),
            )
    except (launching.LaunchError, ValidationError) as exc:
        launch.error = "; ".join(getattr(exc, "messages", None) or [str(exc)])
        log.warning("schedule %s could not launch: %s", schedule.pk, launch.error)
    except (OperationalError, InterfaceError):
        raise  # the database went away: the whole tick is rolled back and tried again
    except Exception as exc:
        # Anything else is this schedule's: recorded on its launch, and its next due time
        # still moves on, so one broken schedule cannot stall the ones due after it.
        log.exception("schedule %s could not launch", schedule.pk)
        launch.error = f"unexpected error: {type(exc).__name__}: {exc}"[:1000]
    launch.run_count = len(runs)
    launch.save(update_fields=["error", "run_count"])
    counters.add("schedule_launches", {"outcome": "launched" if runs else "refused"})
    log.info(
        "schedule %s launched %d run(s) for %s%s",
        schedule.pk,
        len(runs),
        launch.due_at.isoformat(),
        f" (covering {launch.missed} missed due time(s))" if launch.missed else "",
    )
    return runs


def cards_of(schedule: Schedule) -> list[PromptCard]:
    """Its card, or the cards with its tag that have a test case to run (as they are now)."""
    if schedule.card_id:
        return [schedule.card]
    cards = list(
        PromptCard.objects.filter(tags__contains=[schedule.card_tag], cases__enabled=True)
        .distinct()
        .order_by("name")
    )
    if not cards:
        raise launching.LaunchError(f"No card tagged {schedule.card_tag} has a case to run.")
    return cards


def launcher_of(schedule: Schedule) -> AbstractBaseUser:
    """The schedule's owner, who must still be allowed to launch runs."""
    owner = schedule.owner
    if owner is None or not owner.is_active or not owner.has_perm("testruns.launch_testrun"):
        raise launching.LaunchError(
            "The schedule's owner may not launch runs (gone, inactive or without the "
            "permission); give the schedule an owner who may."
        )
    return owner


# --- Reading -------------------------------------------------------------------------------


def schedules_visible_to(user) -> QuerySet[Schedule]:
    """Everyone's with the view permission, else the user's own."""
    schedules = Schedule.objects.select_related("card", "owner").prefetch_related("providers")
    if not user.is_authenticated:
        return schedules.none()
    if user.has_perm("testruns.view_schedule"):
        return schedules
    return schedules.filter(owner=user)


def next_scheduled_for(card: PromptCard) -> Schedule | None:
    """The schedule that runs `card` next (its own or one of its tags'), if any."""
    return (
        Schedule.objects.filter(paused=False, next_due_at__isnull=False)
        .filter(Q(card=card) | Q(card_tag__in=card.tags or []))
        .order_by("next_due_at")
        .first()
    )
