"""The domain: providers, prompt cards and their versions, test cases, runs, results, and the
rows behind the concurrency gate. Behaviour lives in the service modules, not here."""

from __future__ import annotations

import re
import shlex

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.urls import reverse

from testruns.catalog import provider_rules
from testruns.catalog.assertions import assertion_errors
from testruns.catalog.prompts import TemplateSyntaxError, template_variables

ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SIMULATOR_PARAMETERS = {"latency_ms", "jitter_ms", "error_rate"}


def tag_list() -> ArrayField:
    return ArrayField(models.CharField(max_length=50), default=list, blank=True,
                      help_text="Comma-separated tags.")


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
        "API key environment variable", max_length=100, blank=True,
        help_text="The NAME of the environment variable that holds the key; never the key.",
    )
    command = models.CharField(
        max_length=500, blank=True,
        help_text="For local commands: the program and its arguments; run without a shell, "
                  "prompt on stdin, answer on stdout.",
    )
    parameters = models.JSONField(
        default=dict, blank=True,
        help_text="Default request parameters, e.g. {\"temperature\": 0}. For the simulator: "
                  "latency_ms, jitter_ms, error_rate.",
    )
    max_concurrency = models.PositiveIntegerField(
        default=4, help_text="Calls in flight to this provider across all runs.")
    price_input_per_mtok = models.DecimalField(
        "price per million input tokens", max_digits=12, decimal_places=4, default=0)
    price_output_per_mtok = models.DecimalField(
        "price per million output tokens", max_digits=12, decimal_places=4, default=0)
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
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                              on_delete=models.SET_NULL, related_name="prompt_cards")
    system_prompt = models.TextField(blank=True)
    template = models.TextField(help_text="Jinja2 template; test case variables fill it in.")
    baseline_run = models.ForeignKey("TestRun", null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+", help_text="Pinned baseline for reports.")
    grader_provider = models.ForeignKey(
        Provider, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="The provider that grades llm-rubric assertions; empty: each run's own "
                  "provider. A run may name another at launch.")
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
    author = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                               on_delete=models.SET_NULL, related_name="+")
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
        null=True, blank=True,
        help_text="If set, the case passes when the weighted assertion score reaches it.")
    tags = tag_list()
    enabled = models.BooleanField(default=True)
    order = models.IntegerField(default=0)

    class Meta:
        ordering = ["card", "order", "id"]

    def __str__(self) -> str:
        return self.name

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


class TestRun(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        ERROR = "error"
        CANCELLED = "cancelled"

    class Phase(models.TextChoices):
        WAITING = "waiting"
        GENERATING = "generating"
        VALIDATING = "validating"
        DONE = "done"

    FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.ERROR, Status.CANCELLED)

    card = models.ForeignKey(PromptCard, on_delete=models.PROTECT, related_name="runs")
    version = models.ForeignKey(PromptVersion, on_delete=models.PROTECT, related_name="runs")
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="runs")
    launched_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                    on_delete=models.SET_NULL, related_name="test_runs")
    # Pinned at launch (the card's unless the launch named one), so a report says who graded.
    grader_provider = models.ForeignKey(
        Provider, null=True, blank=True, on_delete=models.PROTECT, related_name="graded_runs",
        help_text="Grades llm-rubric assertions; empty: the run's own provider.")
    comparison_group = models.UUIDField(null=True, blank=True, db_index=True)

    # Configuration
    priority = models.IntegerField(default=0, help_text="Higher runs first.")
    max_concurrent_tests = models.PositiveIntegerField(default=4)
    timeout_seconds = models.FloatField(default=60)
    stop_on_failure = models.BooleanField(default=False)
    max_retries = models.PositiveIntegerField(default=2)
    use_cache = models.BooleanField(
        default=False, help_text="Answer from earlier runs' identical requests where possible "
                                 "(only a case's first repeat: see repeats).")
    # Repeats exist to sample the model's variance: a cached answer repeated N times would
    # make pass^N the pass of one answer, so only the first repeat may come from the cache.
    repeats = models.PositiveIntegerField(
        default=1, help_text="How many times each case asks the model; it passes only when "
                             "every repeat passes (pass^N). With the cache on, only the first "
                             "repeat may be answered from it; the others always ask the model.")

    # State
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    phase = models.CharField(max_length=20, choices=Phase.choices, default=Phase.WAITING)
    cancel_requested = models.BooleanField(default=False)
    queued_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error_message = models.TextField(blank=True)
    event_seq = models.PositiveBigIntegerField(default=0)
    last_event_at = models.DateTimeField(null=True, blank=True)

    # Totals, kept current while the run goes
    total_cases = models.PositiveIntegerField(default=0)
    done_count = models.PositiveIntegerField(default=0)
    passed_count = models.PositiveIntegerField(default=0)
    failed_count = models.PositiveIntegerField(default=0)
    error_count = models.PositiveIntegerField(default=0)
    tokens_in = models.PositiveBigIntegerField(default=0)
    tokens_out = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=6, default=0)

    class Meta:
        ordering = ["-queued_at"]
        permissions = [
            ("launch_testrun", "Can launch test runs"),
            ("cancel_testrun", "Can cancel test runs"),
        ]
        indexes = [
            models.Index(fields=["-priority", "queued_at"], name="run_queue_order",
                         condition=Q(status="queued")),
            models.Index(fields=["card", "provider", "-finished_at"], name="run_card_history"),
            models.Index(fields=["status", "-queued_at"], name="run_status_recent"),
            models.Index(fields=["launched_by", "-queued_at"], name="run_launcher_recent"),
        ]

    def __str__(self) -> str:
        return f"Run #{self.pk} of {self.card}"

    def get_absolute_url(self) -> str:
        return reverse("run-detail", args=[self.pk])

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED


class TestResult(models.Model):
    """One per (run, case). The case's variables and assertions are copied in, so a report
    still shows what was tested after the case is edited or deleted."""

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        PASSED = "passed"
        FAILED = "failed"
        ERROR = "error"
        SKIPPED = "skipped"

    DONE = (Status.PASSED, Status.FAILED, Status.ERROR, Status.SKIPPED)

    run = models.ForeignKey(TestRun, on_delete=models.CASCADE, related_name="results")
    case = models.ForeignKey(TestCase, null=True, on_delete=models.SET_NULL, related_name="+")
    position = models.PositiveIntegerField()
    case_name = models.CharField(max_length=200)
    variables = models.JSONField(default=dict)
    assertions = models.JSONField(default=list)
    threshold = models.FloatField(null=True, blank=True)

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    prompt = models.TextField(blank=True)
    output = models.TextField(blank=True)
    assertion_results = models.JSONField(default=list, blank=True)
    score = models.FloatField(null=True, blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    tokens_in = models.PositiveIntegerField(default=0)
    tokens_out = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=6, default=0)
    attempts = models.PositiveIntegerField(default=0)
    repeat_passes = models.PositiveIntegerField(default=0)
    repeat_results = models.JSONField(
        default=list, blank=True,
        help_text="With more than one repeat, each one's evidence in order: output, passed, "
                  "score, assertion_results, latency_ms, tokens_in, tokens_out, cached. The "
                  "result's own output and assertion results are those of the first repeat "
                  "that did not pass (else the last).")
    cached = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    dispatched_at = models.DateTimeField(
        null=True, blank=True, help_text="When its message reached the broker; the sweeper "
                                         "re-sends admitted cases whose message never went out.")
    announced_seq = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="The run event that told the pages about this result.")
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "position"]
        constraints = [
            models.UniqueConstraint(fields=["run", "case"], name="one_result_per_run_case"),
            models.UniqueConstraint(fields=["run", "position"], name="one_result_per_position"),
        ]
        indexes = [
            models.Index(fields=["run", "status"], name="result_run_status"),
            # Admission takes the next pending cases of a run in order; finished ones must
            # not be walked past, or a long run gets slower with every case.
            models.Index(fields=["run", "position"], name="result_pending",
                         condition=Q(status="pending")),
            models.Index(fields=["run"], name="result_unannounced",
                         condition=Q(announced_seq=None,
                                     status__in=["passed", "failed", "error", "skipped"])),
        ]

    def __str__(self) -> str:
        return f"{self.case_name} in run #{self.run_id}"


class Semaphore(models.Model):
    """A counting semaphore. The row is the lock; `in_use` always equals the number of its
    lease rows (both change in the same statement), so a holder checks and takes a slot
    without counting. `effective_limit` is the provider's current AIMD ceiling after 429s,
    `throttled_at` when it was last halved (see gate.throttle_provider)."""

    name = models.CharField(max_length=200, unique=True)
    limit = models.PositiveIntegerField()
    in_use = models.PositiveIntegerField(default=0, editable=False)
    effective_limit = models.FloatField(null=True, blank=True, editable=False)
    throttled_at = models.DateTimeField(
        null=True, blank=True, editable=False,
        help_text="When a 429 last halved the effective limit (database clock).")
    corrections = models.PositiveIntegerField(
        default=0, editable=False,
        help_text="How often the sweeper found in_use apart from the lease rows and reset it.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} (limit {self.limit})"


class Lease(models.Model):
    """One held slot. Its holder heartbeats `expires_at` forward; a dead holder's lease runs
    out and the sweeper reclaims it. Times come from the database clock.

    Only the gate deletes leases, because it lowers `in_use` in the same statement: deleting
    a semaphore, a run or a result that still holds one is refused (PROTECT)."""

    semaphore = models.ForeignKey(Semaphore, on_delete=models.PROTECT, related_name="leases")
    holder = models.CharField(max_length=200)
    run = models.ForeignKey(TestRun, null=True, blank=True, on_delete=models.PROTECT,
                            related_name="leases")
    result = models.ForeignKey(TestResult, null=True, blank=True, on_delete=models.PROTECT,
                               related_name="leases")
    acquired_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    class Meta:
        indexes = [
            models.Index(fields=["expires_at"], name="lease_expiry"),
            models.Index(fields=["holder"], name="lease_holder"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["result"], name="one_lease_per_result"),
            models.UniqueConstraint(fields=["semaphore", "run"], name="one_run_slot_per_run",
                                    condition=Q(result=None)),
        ]

    def __str__(self) -> str:
        return f"{self.semaphore.name} held by {self.holder}"


class ResponseCache(models.Model):
    """A provider's answer to one exact request, for runs that enable the cache. The key
    covers provider, model, parameters and the rendered prompts; errors are never stored."""

    key = models.CharField(max_length=64, unique=True)
    text = models.TextField()
    tokens_in = models.PositiveIntegerField(default=0)
    tokens_out = models.PositiveIntegerField(default=0)
    latency_ms = models.FloatField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.key[:12]


class WorkerHeartbeat(models.Model):
    """One row per live worker process, refreshed by its lease keeper: what the dashboard,
    /healthz and /api/system/resources show about workers."""

    holder = models.CharField(max_length=200, unique=True)
    hostname = models.CharField(max_length=200)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField()
    cpu_percent = models.FloatField(default=0)
    memory_available_mb = models.FloatField(default=0)
    load_average = models.FloatField(default=0)
    accepting = models.BooleanField(default=True, help_text="False while the host is too busy "
                                                            "to take new cases.")
    note = models.CharField(max_length=300, blank=True)

    class Meta:
        ordering = ["hostname", "pid"]

    def __str__(self) -> str:
        return self.holder
