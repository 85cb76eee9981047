"""What a team writes: providers, prompt cards, their versions and test cases."""

from __future__ import annotations

import re
import shlex

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.exceptions import ValidationError
from django.db import models
from django.urls import reverse

from testruns.catalog import provider_rules
from testruns.catalog.assertions import assertion_errors
from testruns.catalog.prompts import TemplateSyntaxError, template_variables

ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SIMULATOR_PARAMETERS = {"latency_ms", "jitter_ms", "error_rate"}


def tag_list() -> ArrayField:
    return ArrayField(
        models.CharField(max_length=50), default=list, blank=True, help_text="Comma-separated tags."
    )


class Provider(models.Model):
    class Kind(models.TextChoices):
        OPENAI = "openai", "OpenAI-compatible HTTP (OpenAI, Ollama, vLLM, LM Studio, ...)"
        ANTHROPIC = "anthropic", "Anthropic"
        COMMAND = "command", "Local command"
        SIMULATOR = "simulator", "Simulator (fake, for demos and benchmarks)"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.SIMULATOR)
    model = models.CharField(max_length=200, blank=True)
    base_url = models.URLField(blank=True, help_text="For OpenAI-compatible servers.")
    api_key_env = models.CharField(
        "API key environment variable",
        max_length=100,
        blank=True,
        help_text="The NAME of the environment variable that holds the key; never the key.",
    )
    command = models.CharField(
        max_length=500,
        blank=True,
        help_text="For local commands: the program and its arguments; run without a shell, "
        "prompt on stdin, answer on stdout.",
    )
    parameters = models.JSONField(
        default=dict,
        blank=True,
        help_text='Default request parameters, e.g. {"temperature": 0}. For the simulator: '
        "latency_ms, jitter_ms, error_rate.",
    )
    max_concurrency = models.PositiveIntegerField(
        default=4, help_text="Calls in flight to this provider across all runs."
    )
    price_input_per_mtok = models.DecimalField(
        "price per million input tokens", max_digits=12, decimal_places=4, default=0
    )
    price_output_per_mtok = models.DecimalField(
        "price per million output tokens", max_digits=12, decimal_places=4, default=0
    )
    timeout_seconds = models.FloatField(default=60)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        label = f"{self.name} ({self.model})" if self.model else self.name
        return f"{label} [simulated]" if self.kind == self.Kind.SIMULATOR else label

    @property
    def is_simulated(self) -> bool:
        return self.kind == self.Kind.SIMULATOR

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if self.api_key_env and not ENV_VAR_NAME.match(self.api_key_env):
            errors["api_key_env"] = (
                "Enter the name of an environment variable (letters, digits, underscores), "
                "not the key itself. The key is read from the environment at call time."
            )
        elif self.api_key_env:
            try:
                provider_rules.check_key_env_name(self.api_key_env)
            except ValidationError as exc:
                errors["api_key_env"] = exc.messages[0]
        if self.base_url:
            try:
                provider_rules.check_base_url(self.base_url)
            except ValidationError as exc:
                errors["base_url"] = exc.messages[0]
        if not isinstance(self.parameters, dict):
            errors["parameters"] = "Parameters must be a JSON object."
        if self.kind in (self.Kind.OPENAI, self.Kind.ANTHROPIC) and not self.model:
            errors["model"] = f"A {self.get_kind_display()} provider needs a model name."
        if self.kind == self.Kind.COMMAND:
            try:
                if not shlex.split(self.command):
                    errors["command"] = "A local command provider needs a command to run."
            except ValueError as exc:
                errors["command"] = f"The command cannot be parsed: {exc}."
        if self.kind == self.Kind.SIMULATOR and isinstance(self.parameters, dict):
            for key in SIMULATOR_PARAMETERS & set(self.parameters):
                value = self.parameters[key]
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    errors["parameters"] = f"{key} must be a non-negative number."
            rate = self.parameters.get("error_rate", 0)
            if isinstance(rate, int | float) and rate > 1:
                errors["parameters"] = "error_rate is a probability between 0 and 1."
        if self.timeout_seconds is not None and self.timeout_seconds <= 0:
            errors["timeout_seconds"] = "The timeout must be positive."
        if self.max_concurrency == 0:
            errors["max_concurrency"] = "At least one call must be allowed."
        if errors:
            raise ValidationError(errors)


class PromptCard(models.Model):
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    tags = tag_list()
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="prompt_cards",
    )
    system_prompt = models.TextField(blank=True)
    template = models.TextField(help_text="Jinja2 template; test case variables fill it in.")
    baseline_run = models.ForeignKey(
        "TestRun",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Pinned baseline for reports.",
    )
    grader_provider = models.ForeignKey(
        Provider,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The provider that grades llm-rubric assertions; empty: each run's own "
        "provider. A run may name another at launch.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("admin:testruns_promptcard_change", args=[self.pk])

    def clean(self) -> None:
        errors = {}
        for field in ("system_prompt", "template"):
            try:
                template_variables(getattr(self, field))
            except TemplateSyntaxError as exc:
                errors[field] = f"Template error on line {exc.lineno}: {exc.message}"
            except RecursionError:
                errors[field] = "The template is nested too deeply to parse."
        if errors:
            raise ValidationError(errors)

    def required_variables(self) -> set[str]:
        """Variables the prompt reads; empty when the prompt does not parse (clean() says so)."""
        try:
            return template_variables(self.system_prompt) | template_variables(self.template)
        except (TemplateSyntaxError, RecursionError):
            return set()


class PromptVersion(models.Model):
    """An immutable snapshot of a card's prompt; a run pins the one it ran."""

    card = models.ForeignKey(PromptCard, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    system_prompt = models.TextField(blank=True)
    template = models.TextField()
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    change_note = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["card", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["card", "number"], name="unique_version_number"),
        ]

    def __str__(self) -> str:
        return f"{self.card} v{self.number}"


class TestCase(models.Model):
    card = models.ForeignKey(PromptCard, on_delete=models.CASCADE, related_name="cases")
    name = models.CharField(max_length=200)
    variables = models.JSONField(default=dict, blank=True)
    assertions = models.JSONField(default=list, blank=True)
    threshold = models.FloatField(
        null=True,
        blank=True,
        help_text="If set, the case passes when the weighted assertion score reaches it.",
    )
    tags = tag_list()
    enabled = models.BooleanField(default=True)
    order = models.IntegerField(default=0)

    class Meta:
        ordering = ["card", "order", "id"]

    def __init__(self, *args, **kwargs) -> None:
        # A case made without an order goes after the card's last case when saved (save()).
        # Rows loaded from the database come positionally, with their stored order.
        if not args:
            kwargs.setdefault("order", None)
        super().__init__(*args, **kwargs)

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs) -> None:
        if self.order is None:
            self.order = self.next_order(self.card_id, excluding=self.pk)
        super().save(*args, **kwargs)

    @classmethod
    def next_order(cls, card_id: int | None, *, excluding: int | None = None) -> int:
        """One past the card's last case: 0 for its first case."""
        cases = cls.objects.filter(card_id=card_id).exclude(pk=excluding)
        last = cases.aggregate(last=models.Max("order"))["last"]
        return 0 if last is None else last + 1

    def clean_fields(self, exclude=None) -> None:
        if self.order is None:  # not chosen yet: save() gives it one
            exclude = {*(exclude or ()), "order"}
        super().clean_fields(exclude)

    def clean(self) -> None:
        errors = {}
        if not isinstance(self.variables, dict):
            errors["variables"] = 'Variables must be a JSON object, e.g. {"name": "Ada"}.'
        elif (card := self._card_or_none()) is not None:
            missing = sorted(card.required_variables() - set(self.variables))
            if missing:
                errors["variables"] = f"Missing variables for the template: {', '.join(missing)}."
        problems = assertion_errors(self.assertions)
        if problems:
            errors["assertions"] = problems
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            errors["threshold"] = "The threshold is a score between 0 and 1."
        if errors:
            raise ValidationError(errors)

    def _card_or_none(self) -> PromptCard | None:
        try:
            return self.card
        except PromptCard.DoesNotExist:
            return None
