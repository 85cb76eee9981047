"""Schedules: a card (or every card with a tag) run against providers on a cron expression,
and one row per due time a schedule launched (engine.scheduling writes them)."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.urls import reverse

from testruns.catalog import cron
from testruns.models.catalog import PromptCard, Provider
from testruns.models.runs import TestRun


def run_setting(name: str) -> models.Field:
    """TestRun's field `name` again, with its type, default, help text and bounds: a schedule
    takes exactly the settings a launch takes (engine.run_settings reads the bounds there)."""
    return TestRun._meta.get_field(name).clone()


class Schedule(models.Model):
    name = models.CharField(max_length=200)
    card = models.ForeignKey(
        PromptCard,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="schedules",
        help_text="The card to run; or leave it empty and give a tag.",
    )
    card_tag = models.CharField(
        max_length=50,
        blank=True,
        help_text="Run every card with this tag (as it is at each due time).",
    )
    providers = models.ManyToManyField(
        Provider, related_name="schedules", help_text="One run per card and provider."
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="schedules",
        help_text="Runs are launched as this user, who must be allowed to launch runs.",
    )
    cron = models.CharField(
        max_length=120,
        help_text="Five fields (minute hour day month weekday), six with seconds first, "
        "or @hourly, @daily, ...",
    )
    time_zone = models.CharField(
        max_length=64, default="UTC", help_text="The IANA time zone the cron fields are read in."
    )
    paused = models.BooleanField(default=False, help_text="A paused schedule launches nothing.")

    priority = run_setting("priority")
    max_concurrent_tests = run_setting("max_concurrent_tests")
    timeout_seconds = run_setting("timeout_seconds")
    stop_on_failure = run_setting("stop_on_failure")
    max_retries = run_setting("max_retries")
    use_cache = run_setting("use_cache")
    repeats = run_setting("repeats")

    # By the database's clock, set by engine.scheduling (None: to be worked out by the next
    # tick, e.g. after an edit made outside the services).
    next_due_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "pk"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(card__isnull=False) & Q(card_tag=""))
                | (Q(card__isnull=True) & ~Q(card_tag="")),
                name="schedule_card_or_tag",
            )
        ]
        indexes = [
            models.Index(fields=["next_due_at"], name="schedule_due", condition=Q(paused=False))
        ]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("schedule-edit", args=[self.pk])

    @property
    def target(self) -> str:
        return self.card.name if self.card_id else f"cards tagged {self.card_tag}"

    def run_options(self) -> dict:
        """The settings every run it launches gets, as launch_runs takes them."""
        return {name: getattr(self, name) for name in RUN_OPTIONS}

    def clean(self) -> None:
        errors: dict[str, str] = {}
        for field, check, value in (
            ("cron", cron.check_cron, self.cron),
            ("time_zone", cron.check_time_zone, self.time_zone),
        ):
            try:
                check(value)
            except ValidationError as exc:
                errors[field] = exc.messages[0]
        if bool(self.card_id) == bool(self.card_tag):
            errors["card"] = "Choose a card or a tag of cards (one of them)."
        if errors:
            raise ValidationError(errors)


RUN_OPTIONS = (
    "priority",
    "max_concurrent_tests",
    "timeout_seconds",
    "stop_on_failure",
    "max_retries",
    "use_cache",
    "repeats",
)


class ScheduleLaunch(models.Model):
    """A due time a schedule launched, once: the unique (schedule, due_at) makes a second
    launch of it impossible whatever raced. After an outage one launch covers the due times
    that passed (`missed` earlier ones), and `due_at` is the latest of them."""

    schedule = models.ForeignKey(Schedule, on_delete=models.CASCADE, related_name="launches")
    due_at = models.DateTimeField()
    launched_at = models.DateTimeField()
    missed = models.PositiveIntegerField(
        default=0, help_text="Earlier due times that passed while no worker ran, covered by this."
    )
    run_count = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True, help_text="Why nothing was launched, if so.")
    worker = models.CharField(
        max_length=200, blank=True, help_text="The process that launched it (host:pid:boot)."
    )

    class Meta:
        ordering = ["-due_at"]
        constraints = [
            models.UniqueConstraint(fields=["schedule", "due_at"], name="one_launch_per_due_time")
        ]

    def __str__(self) -> str:
        return f"{self.schedule} at {self.due_at:%Y-%m-%d %H:%M:%S}"
