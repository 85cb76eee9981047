"""Runs in the admin: read only, cancelled by an action, their results a page at a time; and
the form of the cards' launch action, which launches as the launch page does
(launching.launch_runs)."""

from __future__ import annotations

from urllib.parse import urlencode

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.db.models.functions import Substr
from django.forms.models import BaseInlineFormSet
from django.urls import reverse
from django.utils.html import format_html

from testruns.engine import launching, run_settings
from testruns.models import Provider, TestResult, TestRun
from testruns.reporting.history import run_statistics


class LaunchPermissionMixin:
    def has_launch_permission(self, request) -> bool:
        return request.user.has_perm("testruns.launch_testrun")

    def has_cancel_permission(self, request) -> bool:
        return request.user.has_perm("testruns.cancel_testrun")


class LaunchCardsForm(forms.Form):
    """Launch the chosen cards (their latest versions) as the launch page does: all their
    enabled cases or those with any of some tags, on one or more providers, all or none.
    The settings are TestRun's, with its bounds; one left empty takes the model's default."""

    SETTINGS = ["max_concurrent_tests", "timeout_seconds", "max_retries", "repeats", "priority"]

    providers = forms.ModelMultipleChoiceField(
        queryset=Provider.objects.filter(enabled=True),
        widget=forms.CheckboxSelectMultiple,
        help_text="One run per card and provider; several runs form a comparison group.",
    )
    tags = forms.CharField(
        required=False,
        max_length=500,
        help_text="Only the enabled cases with any of these tags (comma-separated); "
        "empty: all enabled cases.",
    )
    max_concurrent_tests = run_settings.form_field(
        "max_concurrent_tests", required=False, label="Max concurrent cases"
    )
    timeout_seconds = run_settings.form_field(
        "timeout_seconds", required=False, label="Timeout per case (s)"
    )
    max_retries = run_settings.form_field("max_retries", required=False, label="Retries")
    repeats = run_settings.form_field("repeats", required=False)
    stop_on_failure = forms.BooleanField(required=False, label="Stop on first failure")
    use_cache = forms.BooleanField(required=False, label="Use the response cache")
    priority = run_settings.form_field("priority", required=False)

    def launch_arguments(self, cards) -> dict:
        """The keyword arguments of launching.launch_runs (all but the user)."""
        data = self.cleaned_data
        tags = [tag.strip() for tag in data["tags"].split(",") if tag.strip()]
        return {
            "cards": list(cards),
            "providers": list(data["providers"]),
            "tags": tags or None,
            "stop_on_failure": data["stop_on_failure"],
            "use_cache": data["use_cache"],
            **{name: data[name] for name in self.SETTINGS if data[name] is not None},
        }


RESULTS_PER_PAGE = 50
# Kept from each result's output and error in the admin's table; the report shows them whole.
PREVIEW_CHARS = 300
FAILING = (TestResult.Status.FAILED, TestResult.Status.ERROR)


def usd(amount) -> str:
    """A cost with its currency: providers' prices are US dollars per million tokens, and one
    case often costs a fraction of a cent, hence six decimals."""
    return f"${amount:,.6f}"


class ResultPage:
    """Which of a run's results its admin page shows: one page of them in position order,
    all of them or only the failing ones (?results_page=N, &failing=1). The totals are the
    run's stored counters, so paging costs no COUNT over 10,000 results."""

    def __init__(self, run: TestRun, request):
        self.run = run
        self.failing = request.GET.get("failing") == "1"
        self.total = run.failed_count + run.error_count if self.failing else run.total_cases
        self.num_pages = max(1, -(-self.total // RESULTS_PER_PAGE))
        try:
            number = int(request.GET.get("results_page", 1))
        except ValueError:
            number = 1
        self.number = min(max(1, number), self.num_pages)
        self.start = (self.number - 1) * RESULTS_PER_PAGE
        self.end = self.start + RESULTS_PER_PAGE

    @property
    def first_shown(self) -> int:
        return min(self.start + 1, self.total)

    @property
    def last_shown(self) -> int:
        return min(self.end, self.total)

    def query(self, number: int, *, failing: bool | None = None) -> str:
        failing = self.failing if failing is None else failing
        return "?" + urlencode({"results_page": number, **({"failing": 1} if failing else {})})

    @property
    def previous_query(self) -> str | None:
        return self.query(self.number - 1) if self.number > 1 else None

    @property
    def next_query(self) -> str | None:
        return self.query(self.number + 1) if self.number < self.num_pages else None

    @property
    def last_query(self) -> str | None:
        return self.query(self.num_pages) if self.number < self.num_pages - 1 else None

    @property
    def toggle_query(self) -> str:
        return self.query(1, failing=not self.failing)

    @property
    def failing_total(self) -> int:
        return self.run.failed_count + self.run.error_count

    @property
    def report_url(self) -> str:
        return reverse("report", args=[self.run.pk])


class ResultPageFormSet(BaseInlineFormSet):
    """The inline's rows: one page of the run's results, never all of them (a run of 10,000
    cases made this page weigh 22 MB and take half a minute)."""

    result_page: ResultPage  # set per request by TestResultInline.get_formset

    def get_queryset(self) -> QuerySet[TestResult]:
        # Sliced once and kept: the formset asks for its queryset to count its forms and
        # again for each form, and a fresh slice would be a fresh query each time.
        if not hasattr(self, "_result_page_queryset"):
            results = super().get_queryset()
            if self.result_page.failing:
                results = results.filter(status__in=FAILING)
            self._result_page_queryset = results[self.result_page.start : self.result_page.end]
        return self._result_page_queryset


class TestResultInline(admin.TabularInline):
    model = TestResult
    formset = ResultPageFormSet
    template = "admin/testruns/testrun/result_page_inline.html"
    extra = 0
    can_delete = False
    verbose_name_plural = "Results (a page at a time)"
    fields = [
        "number",
        "case_name",
        "status",
        "output_preview",
        "score",
        "latency_ms",
        "tokens_in",
        "tokens_out",
        "cost_usd",
        "attempts",
        "error_preview",
    ]
    readonly_fields = fields

    def get_queryset(self, request) -> QuerySet[TestResult]:
        # Only what the table shows, and the start of each output: the report has the rest.
        return (
            super()
            .get_queryset(request)
            .order_by("position")
            .only(
                "id",
                "run",
                "position",
                "case_name",
                "status",
                "score",
                "latency_ms",
                "tokens_in",
                "tokens_out",
                "cost",
                "attempts",
                "cached",
            )
            .annotate(
                output_start=Substr("output", 1, PREVIEW_CHARS + 1),
                error_start=Substr("error", 1, PREVIEW_CHARS + 1),
            )
        )

    def get_formset(self, request, obj=None, **kwargs) -> type[ResultPageFormSet]:
        formset = super().get_formset(request, obj, **kwargs)  # a new class per request
        if obj is not None:
            formset.result_page = ResultPage(obj, request)
        return formset

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def has_view_permission(self, request, obj=None) -> bool:
        # Results are part of their run: whoever may see the run sees them.
        return request.user.has_perm("testruns.view_testrun") or request.user.has_perm(
            "testruns.change_testrun"
        )

    @admin.display(description="#")
    def number(self, result) -> int:
        return result.position + 1

    @admin.display(description="output")
    def output_preview(self, result) -> str:
        return _clipped(result.output_start)

    @admin.display(description="error")
    def error_preview(self, result) -> str:
        return _clipped(result.error_start)

    @admin.display(description="cost (USD)")
    def cost_usd(self, result) -> str:
        return usd(result.cost)


def _clipped(text: str) -> str:
    return text[:PREVIEW_CHARS] + "…" if len(text) > PREVIEW_CHARS else text


@admin.register(TestRun)
class TestRunAdmin(LaunchPermissionMixin, admin.ModelAdmin):
    list_display = [
        "id",
        "card",
        "version",
        "provider",
        "status",
        "progress",
        "launched_by",
        "queued_at",
        "finished_at",
    ]
    list_select_related = ["card", "version", "provider", "launched_by"]
    list_filter = [
        "status",
        ("card", admin.RelatedOnlyFieldListFilter),
        ("provider", admin.RelatedOnlyFieldListFilter),
        "queued_at",
        ("launched_by", admin.RelatedOnlyFieldListFilter),
    ]
    search_fields = ["card__name", "card__slug", "provider__name"]
    date_hierarchy = "queued_at"
    inlines = [TestResultInline]
    actions = ["cancel_runs"]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    ("card", "version"),
                    ("provider", "grader_provider"),
                    ("status", "phase", "cancel_requested"),
                    "launched_by",
                    "comparison_group",
                    "error_message",
                ]
            },
        ),
        ("Figures", {"fields": ["figures", "pages"]}),  # as the report shows them
        ("Times", {"fields": [("queued_at", "started_at", "finished_at")]}),
        (
            "Configuration",
            {
                "fields": [
                    ("priority", "max_concurrent_tests", "timeout_seconds"),
                    ("max_retries", "repeats", "stop_on_failure", "use_cache"),
                ]
            },
        ),
        (
            "Stored counters",
            {
                "classes": ["collapse"],
                "fields": [
                    ("total_cases", "done_count", "skipped_count"),
                    ("passed_count", "failed_count", "error_count"),
                    ("tokens_in", "tokens_out", "cost_usd"),
                    ("latency_p50_ms", "latency_p95_ms", "aggregated_at"),
                    ("event_seq", "last_event_at"),
                ],
            },
        ),
    ]

    class Media:
        css = {"all": ["testruns/admin.css"]}

    def get_queryset(self, request) -> QuerySet[TestRun]:
        # The change page shows each of these by name: one join instead of a query each.
        return (
            super()
            .get_queryset(request)
            .select_related("card", "version__card", "provider", "grader_provider", "launched_by")
        )

    def get_readonly_fields(self, request, obj=None) -> list[str]:
        return [field.name for field in self.model._meta.fields] + [
            "figures",
            "pages",
            "cost_usd",
        ]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        """A run still queued or running is cancelled first: deleting it would take its
        leases (and slots) away behind the gate's back."""
        return super().has_delete_permission(request, obj) and (obj is None or obj.is_finished)

    @admin.display(description="done")
    def progress(self, run) -> str:
        return format_html(
            '<a href="{}">{} / {}</a>', run.get_absolute_url(), run.done_count, run.total_cases
        )

    @admin.display(description="totals")
    def figures(self, run) -> str:
        """The report's headline figures, from the same function (a finished run's stored
        aggregates, a running run's one pass over its results)."""
        stats = run_statistics(run)
        rate = "–" if stats["pass_rate"] is None else f"{100 * stats['pass_rate']:.0f} %"
        latency = " / ".join(
            "–" if value is None else f"{value:.0f}" for value in (stats["p50_ms"], stats["p95_ms"])
        )
        return format_html(
            "Pass rate <strong>{}</strong> ({} of {} evaluated passed, {} failed, {} errors, "
            "{} skipped) · latency p50 / p95 {} ms · tokens in / out {} / {} · cost {}",
            rate,
            stats["passed"],
            stats["evaluated"],
            run.failed_count,
            run.error_count,
            stats["skipped"],
            latency,
            stats["tokens_in"],
            stats["tokens_out"],
            usd(stats["cost"]),
        )

    @admin.display(description="pages")
    def pages(self, run) -> str:
        report = reverse("report", args=[run.pk])
        return format_html(
            '<a href="{}" class="run-page-link">Live page</a> · '
            '<a href="{}" class="run-page-link">Report (every result)</a> · '
            '<a href="{}?status=failed" class="run-page-link">Failed cases in the report</a>',
            run.get_absolute_url(),
            report,
            report,
        )

    @admin.display(description="cost (USD)")
    def cost_usd(self, run) -> str:
        return usd(run.cost)

    @admin.action(description="Cancel selected runs", permissions=["cancel"])
    def cancel_runs(self, request, queryset) -> None:
        cancelled = sum(launching.cancel_run(run, user=request.user) for run in queryset)
        self.message_user(request, f"Cancelled {cancelled} run(s).")
