"""What ran: test runs, their results, and the response cache."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.urls import reverse

from testruns.models.catalog import PromptCard, PromptVersion, Provider, TestCase


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
    launched_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="test_runs",
    )
    # Pinned at launch (the card's unless the launch named one), so a report says who graded.
    grader_provider = models.ForeignKey(
        Provider,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="graded_runs",
        help_text="Grades llm-rubric assertions; empty: the run's own provider.",
    )
    comparison_group = models.UUIDField(null=True, blank=True, db_index=True)
    schedule_launch = models.ForeignKey(
        "testruns.ScheduleLaunch",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="runs",
        help_text="The scheduled launch that queued it, if one did.",
    )

    # Configuration. The bounds are the product's, declared here only: the launch page, the
    # admin, the API and the CLI build their fields from these validators (engine.run_settings).
    priority = models.IntegerField(
        default=0,
        help_text="Higher runs first.",
        validators=[MinValueValidator(-100), MaxValueValidator(100)],
    )
    max_concurrent_tests = models.PositiveIntegerField(
        default=4, validators=[MinValueValidator(1), MaxValueValidator(64)]
    )
    timeout_seconds = models.FloatField(
        default=60, validators=[MinValueValidator(1), MaxValueValidator(3600)]
    )
    stop_on_failure = models.BooleanField(default=False)
    max_retries = models.PositiveIntegerField(
        default=2, validators=[MinValueValidator(0), MaxValueValidator(10)]
    )
    use_cache = models.BooleanField(
        default=False,
        help_text="Answer from earlier runs' identical requests where possible "
        "(only a case's first repeat: see repeats).",
    )
    # Repeats exist to sample the model's variance: a cached answer repeated N times would
    # make pass^N the pass of one answer, so only the first repeat may come from the cache.
    repeats = models.PositiveIntegerField(
        default=1,
        help_text="How many times each case asks the model; it passes only when "
        "every repeat passes (pass^N). With the cache on, only the first "
        "repeat may be answered from it; the others always ask the model.",
        validators=[MinValueValidator(1), MaxValueValidator(20)],
    )

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
    # Model calls made, counted as each repeat ends: progress for runs with repeats.
    calls_done = models.PositiveBigIntegerField(default=0)
    passed_count = models.PositiveIntegerField(default=0)
    failed_count = models.PositiveIntegerField(default=0)
    error_count = models.PositiveIntegerField(default=0)
    tokens_in = models.PositiveBigIntegerField(default=0)
    tokens_out = models.PositiveBigIntegerField(default=0)
    cost = models.DecimalField(max_digits=14, decimal_places=6, default=0)

    # Aggregates over the results, stored once the run has finished (engine.run_aggregates)
    # so that a report or the history of a 10,000-case run does not recompute them per view.
    # `aggregated_at` is null until they are stored; the counts above are kept while it runs.
    latency_p50_ms = models.FloatField(null=True, blank=True)
    latency_p95_ms = models.FloatField(null=True, blank=True)
    skipped_count = models.PositiveIntegerField(default=0)
    aggregated_at = models.DateTimeField(null=True, blank=True)
    # Bookkeeping after the fact, each step claimed once by a conditional update so that any
    # number of sweepers count a run exactly once (engine.settling): its queue wait counted in
    # /metrics, and its end (counters, notifications) settled.
    wait_counted = models.BooleanField(default=False, editable=False)
    settled_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-queued_at"]
        permissions = [
            ("launch_testrun", "Can launch test runs"),
            ("cancel_testrun", "Can cancel test runs"),
        ]
        indexes = [
            models.Index(
                fields=["-priority", "queued_at"],
                name="run_queue_order",
                condition=Q(status="queued"),
            ),
            models.Index(fields=["card", "provider", "-finished_at"], name="run_card_history"),
            models.Index(fields=["status", "-queued_at"], name="run_status_recent"),
            models.Index(fields=["launched_by", "-queued_at"], name="run_launcher_recent"),
            # The history's order: its first page reads 25 index entries, not every run.
            models.Index(fields=["-queued_at", "-id"], name="run_recent"),
            # What the sweepers' settling steps look for: few rows, whatever the history.
            models.Index(fields=["id"], name="run_unsettled", condition=Q(settled_at=None)),
            models.Index(
                fields=["id"],
                name="run_wait_uncounted",
                condition=Q(wait_counted=False, started_at__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"Run #{self.pk} of {self.card}"

    def get_absolute_url(self) -> str:
        return reverse("run-detail", args=[self.pk])

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED

    @property
    def calls_total(self) -> int:
        """Model calls the run makes in all: each case once per repeat."""
        return self.total_cases * max(1, self.repeats)

    @property
    def progress_percent(self) -> int:
        """Progress in calls (a run with repeats moves with every call, not every case);
        a case reclaimed and run again may count its calls twice, hence the cap."""
        if not self.calls_total:
            return 100 if self.is_finished else 0
        return min(100, 100 * self.calls_done // self.calls_total)


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
    # Of those attempts, the calls made again after a failure (429, 5xx, timeouts), apart
    # from the repeats the run asked for.
    retries = models.PositiveIntegerField(default=0)
    repeat_passes = models.PositiveIntegerField(default=0)
    repeat_results = models.JSONField(
        default=list,
        blank=True,
        help_text="With more than one repeat, each one's evidence in order: output, passed, "
        "score, assertion_results, latency_ms, tokens_in, tokens_out, cached. The "
        "result's own output and assertion results are those of the first repeat "
        "that did not pass (else the last).",
    )
    cached = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    dispatched_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When its message reached the broker; the sweeper "
        "re-sends admitted cases whose message never went out.",
    )
    announced_seq = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="The run event that told the pages about this result."
    )
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["run", "position"]
        permissions = [("review_result", "Can review results: confirm or override verdicts")]
        constraints = [
            models.UniqueConstraint(fields=["run", "case"], name="one_result_per_run_case"),
            models.UniqueConstraint(fields=["run", "position"], name="one_result_per_position"),
        ]
        indexes = [
            models.Index(fields=["run", "status"], name="result_run_status"),
            # Admission takes the next pending cases of a run in order; finished ones must
            # not be walked past, or a long run gets slower with every case.
            models.Index(
                fields=["run", "position"], name="result_pending", condition=Q(status="pending")
            ),
            models.Index(
                fields=["run"],
                name="result_unannounced",
                condition=Q(
                    announced_seq=None, status__in=["passed", "failed", "error", "skipped"]
                ),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.case_name} in run #{self.run_id}"


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
