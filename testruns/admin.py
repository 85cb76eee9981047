"""The admin, where users keep cards, cases and providers. Declarative where it can be; the
few custom steps call services, so the admin does what the pages and the API do."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Count, OuterRef, Q, Subquery
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.text import slugify

from testruns.catalog import card_files, provider_rules
from testruns.engine import gate, providers, services
from testruns.models import (
    PromptCard,
    PromptVersion,
    Provider,
    Semaphore,
    TestCase,
    TestResult,
    TestRun,
)


class TestCaseInline(admin.StackedInline):
    model = TestCase
    extra = 0
    fields = [("name", "enabled", "order"), "variables", "assertions", ("threshold", "tags")]


class PromptVersionInline(admin.TabularInline):
    model = PromptVersion
    extra = 0
    can_delete = False
    fields = ["number", "created_at", "author", "change_note", "template"]
    readonly_fields = fields
    ordering = ["-number"]
    verbose_name_plural = "Version history (read-only)"

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class TagFilter(admin.SimpleListFilter):
    title = "tag"
    parameter_name = "tag"

    def lookups(self, request, model_admin):
        tags = sorted({tag for tags in PromptCard.objects.values_list("tags", flat=True)
                       for tag in tags})
        return [(tag, tag) for tag in tags]

    def queryset(self, request, queryset):
        return queryset.filter(tags__contains=[self.value()]) if self.value() else queryset


class LastStatusFilter(admin.SimpleListFilter):
    title = "last run status"
    parameter_name = "last_status"

    def lookups(self, request, model_admin):
        return [*TestRun.Status.choices, ("never", "Never run")]

    def queryset(self, request, queryset):
        if self.value() == "never":
            return queryset.filter(last_status=None)
        return queryset.filter(last_status=self.value()) if self.value() else queryset


class PromptCardForm(forms.ModelForm):
    change_note = forms.CharField(
        required=False, max_length=300,
        help_text="Why the prompt changed; kept with the new version.")

    class Meta:
        model = PromptCard
        fields = "__all__"


class LaunchForm(forms.Form):
    provider = forms.ModelChoiceField(queryset=Provider.objects.filter(enabled=True))
    priority = forms.IntegerField(initial=0, min_value=-100, max_value=100)


class ImportForm(forms.Form):
    file = forms.FileField(help_text="YAML, JSON (ours or promptfoo's) or CSV of test cases.")
    card = forms.ModelChoiceField(queryset=PromptCard.objects.all(), required=False,
                                  help_text="For CSV files: the card the cases belong to.")


class LaunchPermissionMixin:
    def has_launch_permission(self, request):
        return request.user.has_perm("testruns.launch_testrun")

    def has_cancel_permission(self, request):
        return request.user.has_perm("testruns.cancel_testrun")


@admin.register(PromptCard)
class PromptCardAdmin(LaunchPermissionMixin, admin.ModelAdmin):
    list_display = ["name", "slug", "tag_list", "owner", "last_status", "pass_rate", "updated_at"]
    list_select_related = ["owner"]
    search_fields = ["name", "slug", "description", "template"]
    list_filter = [TagFilter, ("owner", admin.RelatedOnlyFieldListFilter), LastStatusFilter]
    form = PromptCardForm
    prepopulated_fields = {"slug": ["name"]}
    fieldsets = [
        (None, {"fields": ["name", "slug", "description", "tags", "owner"]}),
        ("Prompt", {"fields": ["system_prompt", "template", "change_note"],
                    "description": "Saving a changed prompt creates a new immutable version."}),
        ("Grading", {"fields": ["grader_provider"],
                     "description": "Who grades llm-rubric assertions; a launch may name "
                                    "another provider."}),
        ("Reports", {"fields": ["baseline_run"], "classes": ["collapse"]}),
    ]
    raw_id_fields = ["baseline_run"]
    inlines = [TestCaseInline, PromptVersionInline]
    actions = ["launch_runs", "duplicate_cards", "export_yaml", "export_json"]
    change_list_template = "admin/testruns/promptcard/change_list.html"

    def get_queryset(self, request):
        finished = TestRun.objects.filter(card=OuterRef("pk")).exclude(
            status__in=[TestRun.Status.QUEUED, TestRun.Status.RUNNING]
        ).order_by("-finished_at", "-pk")
        return super().get_queryset(request).annotate(
            last_status=Subquery(finished.values("status")[:1]),
            last_passed=Subquery(finished.values("passed_count")[:1]),
            last_total=Subquery(finished.values("total_cases")[:1]),
        )

    @admin.display(description="tags")
    def tag_list(self, card):
        return ", ".join(card.tags)

    @admin.display(description="last run", ordering="last_status")
    def last_status(self, card):
        return card.last_status or "never run"

    @admin.display(description="pass rate")
    def pass_rate(self, card):
        if not card.last_total:
            return "–"
        return f"{100 * card.last_passed / card.last_total:.0f} %"

    def save_model(self, request, obj, form, change):
        if not change and obj.owner is None:
            obj.owner = request.user
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        services.snapshot_version(form.instance, author=request.user,
                                  note=form.cleaned_data.get("change_note", ""))

    @admin.action(description="Launch run", permissions=["launch"])
    def launch_runs(self, request, queryset):
        form = LaunchForm(request.POST if "launch" in request.POST else None)
        if form.is_valid():
            launched, problems = [], []
            for card in queryset:
                try:
                    launched.append(services.launch_run(
                        card=card, provider=form.cleaned_data["provider"], user=request.user,
                        priority=form.cleaned_data["priority"]))
                except services.LaunchError as exc:
                    problems.append(str(exc))
            for problem in problems:
                self.message_user(request, problem, messages.ERROR)
            if launched:
                self.message_user(request, f"Queued {len(launched)} run(s).", messages.SUCCESS)
            if len(launched) == 1:
                return redirect(launched[0])
            return None
        return render(request, "admin/testruns/launch_runs.html", {
            **self.admin_site.each_context(request), "title": "Launch runs",
            "cards": queryset, "form": form, "opts": self.model._meta,
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
        })

    @admin.action(description="Duplicate card", permissions=["add"])
    def duplicate_cards(self, request, queryset):
        for card in queryset:
            copy = services.duplicate_card(card, user=request.user)
            self.message_user(request, format_html('Created <a href="{}">{}</a>.',
                                                   reverse("admin:testruns_promptcard_change",
                                                           args=[copy.pk]), copy.name))

    @admin.action(description="Export as YAML")
    def export_yaml(self, request, queryset):
        return self._export(queryset, "yaml", "application/yaml")

    @admin.action(description="Export as JSON")
    def export_json(self, request, queryset):
        return self._export(queryset, "json", "application/json")

    def _export(self, queryset, fmt, content_type):
        cards = list(queryset.prefetch_related("cases"))
        name = slugify(cards[0].slug) if len(cards) == 1 else "prompt-cards"
        response = HttpResponse(card_files.export_cards(cards, fmt), content_type=content_type)
        response["Content-Disposition"] = f'attachment; filename="{name}.{fmt}"'
        return response

    def get_urls(self):
        return [
            path("import/", self.admin_site.admin_view(self.import_view),
                 name="testruns_promptcard_import"),
            *super().get_urls(),
        ]

    def import_view(self, request):
        if not self.has_add_permission(request):
            return redirect("admin:testruns_promptcard_changelist")
        form = ImportForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            upload = form.cleaned_data["file"]
            try:
                # The card matters only for a CSV of cases; YAML and JSON name their cards.
                card = form.cleaned_data["card"] if upload.name.lower().endswith(".csv") else None
                report = card_files.import_cards(upload.read(), filename=upload.name,
                                                 user=request.user, card=card)
            except card_files.CardFileError as exc:
                for error in exc.errors:
                    form.add_error("file", error)
            else:
                self.message_user(request, report.summary(), messages.SUCCESS)
                return redirect("admin:testruns_promptcard_changelist")
        return render(request, "admin/testruns/promptcard/import.html", {
            **self.admin_site.each_context(request), "title": "Import cards and test cases",
            "form": form, "opts": self.model._meta,
        })


class ProviderForm(forms.ModelForm):
    # Local servers (Ollama, vLLM, LM Studio, llama.cpp) usually speak plain http.
    base_url = forms.URLField(required=False, assume_scheme="http",
                              help_text="For OpenAI-compatible servers, e.g. "
                                        "http://localhost:11434/v1 for Ollama.")

    class Meta:
        model = Provider
        fields = "__all__"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "api_key_env" in self.fields:  # say the rule before it refuses a name
            self.fields["api_key_env"].help_text = (
                "The NAME of the environment variable that holds the key; never the key. "
                f"It must match {provider_rules.key_env_pattern().pattern} "
                "(PROVIDER_KEY_ENV_PATTERN) and not be one of this app's own settings.")

    def clean(self):
        cleaned = super().clean()
        # Only a superuser may make the app run a program on the worker hosts.
        if cleaned.get("kind") == Provider.Kind.COMMAND and not self.user.is_superuser:
            raise ValidationError({"kind": "Only superusers may create or change "
                                           "local command providers."})
        return cleaned


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    form = ProviderForm
    list_display = ["name", "kind", "model", "max_concurrency", "prices", "enabled"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name", "model", "base_url"]
    actions = ["test_connection"]
    fieldsets = [
        (None, {"fields": ["name", "kind", "enabled", "model", "base_url", "api_key_env",
                           "command"]}),
        ("Calls", {"fields": ["parameters", "max_concurrency", "timeout_seconds"]}),
        ("Prices", {"fields": ["price_input_per_mtok", "price_output_per_mtok"]}),
    ]

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change, **kwargs)
        form.user = request.user
        return form

    def has_change_permission(self, request, obj=None):
        if obj is not None and obj.kind == Provider.Kind.COMMAND and not request.user.is_superuser:
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return self.has_change_permission(request, obj) and super().has_delete_permission(
            request, obj)

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        services.save_provider_limit(obj)

    @admin.display(description="$ / M tokens (in / out)")
    def prices(self, provider):
        return f"{provider.price_input_per_mtok:g} / {provider.price_output_per_mtok:g}"

    # It sends the provider's key to its base URL from the web process: only for those who
    # may change the provider anyway (and, for a local command, only superusers).
    @admin.action(description="Test connection", permissions=["change"])
    def test_connection(self, request, queryset):
        for provider in queryset:
            if not self.has_change_permission(request, provider):
                self.message_user(request, f"{provider.name}: you may not change this "
                                           "provider, so you may not test it.", messages.ERROR)
                continue
            try:
                answer = providers.test_connection(provider)
            except providers.ProviderError as exc:
                self.message_user(request, f"{provider.name}: failed: {exc}", messages.ERROR)
            else:
                self.message_user(request, f"{provider.name}: answered {answer[:200]!r}",
                                  messages.SUCCESS)


class TestResultInline(admin.TabularInline):
    model = TestResult
    extra = 0
    can_delete = False
    fields = ["position", "case_name", "status", "output", "score", "latency_ms", "tokens_in",
              "tokens_out", "cost", "attempts", "error"]
    readonly_fields = fields
    ordering = ["position"]

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(TestRun)
class TestRunAdmin(LaunchPermissionMixin, admin.ModelAdmin):
    list_display = ["id", "card", "version", "provider", "status", "progress", "launched_by",
                    "queued_at", "finished_at"]
    list_select_related = ["card", "version", "provider", "launched_by"]
    list_filter = ["status", ("card", admin.RelatedOnlyFieldListFilter),
                   ("provider", admin.RelatedOnlyFieldListFilter), "queued_at",
                   ("launched_by", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["card__name", "card__slug", "provider__name"]
    date_hierarchy = "queued_at"
    inlines = [TestResultInline]
    actions = ["cancel_runs"]

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        """A run still queued or running is cancelled first: deleting it would take its
        leases (and slots) away behind the gate's back."""
        return super().has_delete_permission(request, obj) and (obj is None or obj.is_finished)

    @admin.display(description="done")
    def progress(self, run):
        return format_html('<a href="{}">{} / {}</a>', run.get_absolute_url(), run.done_count,
                           run.total_cases)

    @admin.action(description="Cancel selected runs", permissions=["cancel"])
    def cancel_runs(self, request, queryset):
        cancelled = sum(services.cancel_run(run, user=request.user) for run in queryset)
        self.message_user(request, f"Cancelled {cancelled} run(s).")


@admin.register(PromptVersion)
class PromptVersionAdmin(admin.ModelAdmin):
    """Versions are history: viewable, never edited or deleted."""

    list_display = ["card", "number", "author", "created_at", "change_note"]
    list_select_related = ["card", "author"]
    list_filter = [("card", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["card__name", "change_note"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Semaphore)
class SemaphoreAdmin(admin.ModelAdmin):
    list_display = ["name", "limit", "in_use", "updated_at"]
    list_editable = ["limit"]
    search_fields = ["name"]
    readonly_fields = ["in_use", "effective_limit"]

    def save_model(self, request, obj, form, change):
        """Only the limit is written, through the gate: saving the whole row would put the
        in_use and AIMD ceiling read when the page opened over what workers wrote since."""
        if not change:
            gate.ensure_semaphore(obj.name, obj.limit)
        gate.set_limit(obj.name, obj.limit)  # a raised limit promotes waiters at once
        obj.refresh_from_db()

    def has_delete_permission(self, request, obj=None):
        """A semaphore holding leases stays (its slots would be lost); an idle one may go
        and is created again with its configured limit when next needed."""
        return super().has_delete_permission(request, obj) and (
            obj is None or not obj.leases.exists())

    def get_queryset(self, request):
        from django.db.models.functions import Now

        return super().get_queryset(request).annotate(
            live=Count("leases", filter=Q(leases__expires_at__gt=Now())))

    @admin.display(description="in use", ordering="live")
    def in_use(self, semaphore):
        return semaphore.live
