"""Runs in the admin: read only, cancelled by an action; and the form of the cards' launch
action, which launches as the launch page does (launching.launch_runs)."""

from __future__ import annotations

from django import forms
from django.contrib import admin
from django.utils.html import format_html

from testruns.engine import launching, run_settings
from testruns.models import Provider, TestResult, TestRun


class LaunchPermissionMixin:
    def has_launch_permission(self, request) -> bool:
        return request.user.has_perm("testruns.launch_testrun")

    def has_cancel_permission(self, request) -> bool:
        return request.user.has_perm("testruns.cancel_testrun")


class LaunchForm(forms.Form):
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


class TestResultInline(admin.TabularInline):
    model = TestResult
    extra = 0
    can_delete = False
    fields = [
        "position",
        "case_name",
        "status",
        "output",
        "score",
        "latency_ms",
        "tokens_in",
        "tokens_out",
        "cost",
        "attempts",
        "error",
    ]
    readonly_fields = fields
    ordering = ["position"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False


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

    def get_readonly_fields(self, request, obj=None) -> list[str]:
        return [field.name for field in self.model._meta.fields]

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

    @admin.action(description="Cancel selected runs", permissions=["cancel"])
    def cancel_runs(self, request, queryset) -> None:
        cancelled = sum(launching.cancel_run(run, user=request.user) for run in queryset)
        self.message_user(request, f"Cancelled {cancelled} run(s).")
