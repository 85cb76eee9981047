"""Notifications: who is told about a finished run (a rule of a schedule or of a card), each
delivery of a rule for a run, and every attempt at it (the delivery log)."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import models
from django.db.models import Q

from testruns.catalog import provider_rules
from testruns.models.catalog import ENV_VAR_NAME, PromptCard
from testruns.models.runs import TestRun
from testruns.models.schedules import Schedule

# The events a rule may ask for, in the order a notice names them (the first one a run meets
# is its headline).
EVENTS = ("regression", "error", "failure", "finish")


class NotificationRule(models.Model):
    class Channel(models.TextChoices):
        WEBHOOK = "webhook", "Webhook (JSON, signed with HMAC-SHA256)"
        SLACK = "slack", "Slack-compatible incoming webhook"
        EMAIL = "email", "E-mail"

    name = models.CharField(max_length=200)
    schedule = models.ForeignKey(
        Schedule,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="notifications",
        help_text="Runs this schedule launched; or leave it empty and choose a card.",
    )
    card = models.ForeignKey(
        PromptCard,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="notifications",
        help_text="Every run of this card, however it was launched.",
    )
    channel = models.CharField(max_length=20, choices=Channel.choices, default=Channel.WEBHOOK)
    url = models.URLField(
        max_length=500, blank=True, help_text="Where webhook and Slack notices are POSTed."
    )
    secret_env = models.CharField(
        max_length=100,
        blank=True,
        help_text="Webhooks: the name of the environment variable (on the worker hosts) that "
        "holds the shared secret; the body is signed with it in X-PCR-Signature. Slack: "
        "the variable that holds the incoming-webhook URL (itself a secret), instead of the "
        "URL above. The secret itself is never stored.",
    )
    recipients = models.TextField(blank=True, help_text="E-mail: addresses, comma-separated.")
    on_regression = models.BooleanField(
        default=True,
        help_text="A case got worse than its baseline beyond what chance explains "
        "(docs/statistics.md).",
    )
    on_failure = models.BooleanField(default=True, help_text="The run failed.")
    on_error = models.BooleanField(default=True, help_text="The run ended in an error.")
    on_finish = models.BooleanField(default=False, help_text="Every finished run.")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name", "pk"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(schedule__isnull=False) & Q(card__isnull=True))
                | (Q(schedule__isnull=True) & Q(card__isnull=False)),
                name="notification_schedule_or_card",
            )
        ]

    def __str__(self) -> str:
        return self.name

    def events(self) -> list[str]:
        return [event for event in EVENTS if getattr(self, f"on_{event}")]

    def recipient_list(self) -> list[str]:
        return [address.strip() for address in self.recipients.split(",") if address.strip()]

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if bool(self.schedule_id) == bool(self.card_id):
            errors["schedule"] = "Choose a schedule or a card (one of them)."
        if not self.events():
            errors["on_finish"] = "Choose at least one event to be told about."
        if self.channel == self.Channel.EMAIL:
            errors |= self._email_errors()
        else:
            errors |= self._url_errors()
        if errors:
            raise ValidationError(errors)

    def _email_errors(self) -> dict[str, str]:
        addresses = self.recipient_list()
        if not addresses:
            return {"recipients": "Give at least one e-mail address."}
        for address in addresses:
            try:
                validate_email(address)
            except ValidationError:
                return {"recipients": f"{address} is not an e-mail address."}
        return {}

    def _url_errors(self) -> dict[str, str]:
        errors: dict[str, str] = {}
        if self.channel == self.Channel.SLACK and self.secret_env:
            # The incoming-webhook URL comes from that variable on the workers.
            if self.url:
                errors["url"] = "Give the URL or the variable that holds it, not both."
            elif not ENV_VAR_NAME.match(self.secret_env):
                errors["secret_env"] = "Enter the name of an environment variable, not the URL."
            else:
                try:
                    provider_rules.check_key_env_name(self.secret_env)
                except ValidationError as exc:
                    errors["secret_env"] = exc.messages[0]
            return errors
        if not self.url:
            errors["url"] = "Give the URL notices are POSTed to."
        else:
            try:
                provider_rules.check_base_url(self.url)
            except ValidationError as exc:
                errors["url"] = exc.messages[0]
        if self.channel == self.Channel.WEBHOOK:
            if not self.secret_env:
                errors["secret_env"] = (
                    "A webhook is signed: give the name of the environment variable that "
                    "holds its secret (e.g. ALERTS_WEBHOOK_KEY)."
                )
            elif not ENV_VAR_NAME.match(self.secret_env):
                errors["secret_env"] = (
                    "Enter the name of an environment variable (letters, digits, "
                    "underscores), not the secret itself."
                )
            else:
                try:
                    provider_rules.check_key_env_name(self.secret_env)
                except ValidationError as exc:
                    errors["secret_env"] = exc.messages[0]
        return errors


class NotificationDelivery(models.Model):
    """One rule's notice about one run, sent at most once (unique (rule, run)); its attempts
    are retried with backoff through Dramatiq (notify.delivering)."""

    class Status(models.TextChoices):
        PENDING = "pending"  # created when the run was settled; its message is on the way
        SENDING = "sending"  # an attempt is in progress (claimed until `claimed_until`)
        RETRYING = "retrying"  # an attempt failed; the next is due at `next_attempt_at`
        SENT = "sent"
        SKIPPED = "skipped"  # the run met none of the rule's events
        FAILED = "failed"  # every attempt failed

    rule = models.ForeignKey(NotificationRule, on_delete=models.CASCADE, related_name="deliveries")
    run = models.ForeignKey(TestRun, on_delete=models.CASCADE, related_name="notifications")
    channel = models.CharField(max_length=20, choices=NotificationRule.Channel.choices)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    events = models.JSONField(default=list, blank=True, help_text="The events the run met.")
    payload = models.JSONField(
        default=dict, blank=True, help_text="What was sent (the same at every attempt)."
    )
    summary = models.TextField(blank=True, help_text="What the notice said, in a line.")
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField()
    dispatched_at = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    claimed_until = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        verbose_name_plural = "notification deliveries"
        constraints = [
            models.UniqueConstraint(fields=["rule", "run"], name="one_delivery_per_rule_and_run")
        ]
        indexes = [
            models.Index(
                fields=["status"],
                name="delivery_open",
                condition=Q(status__in=["pending", "sending", "retrying"]),
            )
        ]

    def __str__(self) -> str:
        return f"{self.rule} about run #{self.run_id}"


class DeliveryAttempt(models.Model):
    delivery = models.ForeignKey(
        NotificationDelivery, on_delete=models.CASCADE, related_name="attempt_log"
    )
    number = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    ok = models.BooleanField()
    status_code = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["delivery", "number"]
        constraints = [
            models.UniqueConstraint(fields=["delivery", "number"], name="one_attempt_per_number")
        ]

    def __str__(self) -> str:
        return f"attempt {self.number} of {self.delivery}"
