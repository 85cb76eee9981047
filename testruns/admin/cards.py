"""Prompt cards in the admin: their test cases and version history inline, filters by tag
and last run, launching runs (an action, and "Run this card" on a card's page, which leads to
the launch page), duplicating, export, and the import page. "View on site" is the card's
history."""

from __future__ import annotations

from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.text import slugify

from testruns.admin.case_editor import TestCaseInline
from testruns.admin.runs import LaunchCardsForm, LaunchPermissionMixin
from testruns.admin.versions import PromptVersionInline
from testruns.catalog import card_files, cards
from testruns.engine import launching
from testruns.models import PromptCard, TestRun
from testruns.reporting import statistics


class TagFilter(admin.SimpleListFilter):
    title = "tag"
    parameter_name = "tag"

    def lookups(self, request, model_admin) -> list[tuple[str, str]]:
        tags = sorted(
            {tag for tags in PromptCard.objects.values_list("tags", flat=True) for tag in tags}
        )
        return [(tag, tag) for tag in tags]

    def queryset(self, request, queryset) -> QuerySet[PromptCard]:
        return queryset.filter(tags__contains=[self.value()]) if self.value() else queryset


class LastStatusFilter(admin.SimpleListFilter):
    title = "last run status"
    parameter_name = "last_status"

    def lookups(self, request, model_admin) -> list[tuple[str, str]]:
        return [*TestRun.Status.choices, ("never", "Never run")]

    def queryset(self, request, queryset) -> QuerySet[PromptCard]:
        if self.value() == "never":
            return queryset.filter(last_status=None)
        return queryset.filter(last_status=self.value()) if self.value() else queryset


class ChangeNoteInput(forms.TextInput):
    """The change note's box and, once the form has asked for a note (`asked`), a hidden
    flag saying so, with which the next save goes through without one."""

    asked = False

    def render(self, name, value, attrs=None, renderer=None) -> SafeString:
        box = super().render(name, value, attrs, renderer)
        if not self.asked:
            return box
        return format_html('{}<input type="hidden" name="{}" value="1">', box, name + CONFIRMED)


CONFIRMED = "_confirmed"  # after the change note's name: the hidden flag's
NOTE_ASKED = "You changed the prompt: add a change note, or save again to save without one."


def _lf(text: str | None) -> str:
    # Browsers send a textarea's line ends as CRLF: an untouched multi-line prompt saved from
    # the admin is no change of the prompt, and makes no new version.
    return (text or "").replace("\r\n", "\n")


class PromptCardForm(forms.ModelForm):
    change_note = forms.CharField(
        required=False,
        max_length=300,
        widget=ChangeNoteInput,
        help_text="Why the prompt changed; kept with the new version. Optional, but asked for "
        "when the system prompt or the template changed.",
    )

    class Meta:
        model = PromptCard
        fields = "__all__"

    def clean_system_prompt(self) -> str:
        return _lf(self.cleaned_data.get("system_prompt"))

    def clean_template(self) -> str:
        return _lf(self.cleaned_data.get("template"))

    def clean(self) -> dict:
        cleaned = super().clean()
        try:  # the baseline's rule is the pin's (the report page's and the API's)
            cards.check_baseline(self.instance, cleaned.get("baseline_run"))
        except ValidationError as exc:
            self.add_error(None, exc)
        self._ask_for_a_change_note(cleaned)
        return cleaned

    def _ask_for_a_change_note(self, cleaned: dict) -> None:
        """A changed prompt of an existing card without a note is sent back once, asking for
        one; the page then carries a flag with which saving again saves without it. (The
        instance still holds the stored prompt here: the form copies its data in after.)"""
        if self.instance._state.adding or cleaned.get("change_note"):
            return
        fields = ("system_prompt", "template")
        if all(_lf(cleaned.get(f)) == _lf(getattr(self.instance, f)) for f in fields):
            return
        if self.data.get(self.add_prefix("change_note") + CONFIRMED) == "1":
            return
        self.fields["change_note"].widget.asked = True
        self.add_error("change_note", NOTE_ASKED)


class ImportForm(forms.Form):
    file = forms.FileField(
        help_text="YAML, JSON (ours or promptfoo's), CSV of test cases, or a .zip of a promptfoo "
        "project (its promptfooconfig.yaml and the files it names with file://)."
    )
    card = forms.ModelChoiceField(
        queryset=PromptCard.objects.all(),
        required=False,
        help_text="For CSV files: the card the cases belong to.",
    )
    update = forms.BooleanField(
        required=False,
        help_text="Apply changes to cards that exist already. Without it, an import that would "
        "change them lists the changes and saves nothing.",
    )
    strict = forms.BooleanField(
        required=False,
        help_text="Refuse the import if any key, assertion or provider would be left out.",
    )
    create_providers = forms.BooleanField(
        required=False,
        label="Create missing providers",
        help_text="Create the promptfoo providers that match none here, disabled, with the "
        "name of their key's variable only.",
    )


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
        (
            "Prompt",
            {
                "fields": ["system_prompt", "template", "change_note"],
                "description": "Saving a changed prompt creates a new immutable version.",
            },
        ),
        (
            "Grading",
            {
                "fields": ["grader_provider"],
                "description": "Who grades llm-rubric assertions; a launch may name "
                "another provider.",
            },
        ),
        ("Reports", {"fields": ["baseline_run"], "classes": ["collapse"]}),
    ]
    raw_id_fields = ["baseline_run"]
    inlines = [TestCaseInline, PromptVersionInline]
    actions = ["launch_runs", "duplicate_cards", "export_yaml", "export_json", "export_promptfoo"]
    change_list_template = "admin/testruns/promptcard/change_list.html"
    # change_form_template: Django finds admin/testruns/promptcard/change_form.html by name.

    class Media:
        css = {"all": ["testruns/admin.css"]}

    def view_on_site(self, card) -> str:
        """The card's runs on the site: its history, with "Run this card" and each report.
        The card's get_absolute_url is this admin page, so the default looped back here."""
        return reverse("history") + "?" + urlencode({"card": card.pk})

    def change_view(self, request, object_id, form_url="", extra_context=None) -> HttpResponse:
        extra_context = {**(extra_context or {}), "can_launch": self.has_launch_permission(request)}
        return super().change_view(request, object_id, form_url, extra_context)

    def get_queryset(self, request) -> QuerySet[PromptCard]:
        finished = (
            TestRun.objects.filter(card=OuterRef("pk"))
            .exclude(status__in=[TestRun.Status.QUEUED, TestRun.Status.RUNNING])
            .order_by("-finished_at", "-pk")
        )
        return (
            super()
            .get_queryset(request)
            .annotate(
                last_status=Subquery(finished.values("status")[:1]),
                last_passed=Subquery(finished.values("passed_count")[:1]),
                last_failed=Subquery(finished.values("failed_count")[:1]),
                last_errors=Subquery(finished.values("error_count")[:1]),
            )
        )

    @admin.display(description="tags")
    def tag_list(self, card) -> str:
        return format_html_join("", '<span class="tag-chip">{}</span>', ((t,) for t in card.tags))

    @admin.display(description="last run", ordering="last_status")
    def last_status(self, card) -> str:
        return card.last_status or "never run"

    @admin.display(description="pass rate")
    def pass_rate(self, card) -> str:
        rate = statistics.pass_rate(
            card.last_passed or 0, card.last_failed or 0, card.last_errors or 0
        )
        return "–" if rate is None else f"{100 * rate:.0f} %"

    def save_model(self, request, obj, form, change) -> None:
        # save_card instead of obj.save(): it also snapshots the version (and gives a new card
        # its owner), as the API and imports do. save_related then saves the cases as usual.
        cards.save_card(obj, user=request.user, note=form.cleaned_data.get("change_note", ""))

    @admin.action(description="Launch run", permissions=["launch"])
    def launch_runs(self, request, queryset) -> HttpResponse | None:
        """Ask for the providers and settings, then launch through launching.launch_runs:
        all the runs or none, several as one comparison group (as the launch page)."""
        form = LaunchCardsForm(request.POST if "launch" in request.POST else None)
        if form.is_valid():
            try:
                runs = launching.launch_runs(user=request.user, **form.launch_arguments(queryset))
            except launching.LaunchError as exc:
                form.add_error(None, str(exc))
            else:
                # Transient: it describes the launch, which the next page's own state outlives.
                self.message_user(
                    request,
                    f"Launched {len(runs)} run(s).",
                    messages.SUCCESS,
                    extra_tags="transient",
                )
                if len(runs) == 1:
                    return redirect(runs[0])
                return redirect("comparison", group=runs[0].comparison_group)
        return render(
            request,
            "admin/testruns/launch_runs.html",
            {
                **self.admin_site.each_context(request),
                "title": "Launch runs",
                "cards": queryset,
                "form": form,
                "opts": self.model._meta,
                "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
            },
        )

    @admin.action(description="Duplicate card", permissions=["add"])
    def duplicate_cards(self, request, queryset) -> None:
        for card in queryset:
            copy = cards.duplicate_card(card, user=request.user)
            self.message_user(
                request,
                format_html(
                    'Created <a href="{}">{}</a>.',
                    reverse("admin:testruns_promptcard_change", args=[copy.pk]),
                    copy.name,
                ),
            )

    @admin.action(description="Export as YAML")
    def export_yaml(self, request, queryset) -> HttpResponse:
        return self._export(queryset, "yaml", "application/yaml")

    @admin.action(description="Export as JSON")
    def export_json(self, request, queryset) -> HttpResponse:
        return self._export(queryset, "json", "application/json")

    @admin.action(description="Export for promptfoo (zip)")
    def export_promptfoo(self, request, queryset) -> HttpResponse:
        """A zip of promptfooconfig.yaml (and prompts/) that `promptfoo eval` runs, with the
        providers of the cards' latest runs."""
        cards = list(queryset.order_by("slug").prefetch_related("cases"))
        providers = card_files.default_providers(cards)
        response = HttpResponse(
            card_files.export_promptfoo_zip(cards, providers), content_type="application/zip"
        )
        response["Content-Disposition"] = 'attachment; filename="promptfoo.zip"'
        return response

    def _export(self, queryset, fmt, content_type):
        cards = list(queryset.prefetch_related("cases"))
        name = slugify(cards[0].slug) if len(cards) == 1 else "prompt-cards"
        response = HttpResponse(card_files.export_cards(cards, fmt), content_type=content_type)
        response["Content-Disposition"] = f'attachment; filename="{name}.{fmt}"'
        return response

    def get_urls(self) -> list:
        return [
            path(
                "import/",
                self.admin_site.admin_view(self.import_view),
                name="testruns_promptcard_import",
            ),
            *super().get_urls(),
        ]

    def import_view(self, request) -> HttpResponse:
        if not self.has_add_permission(request):
            return redirect("admin:testruns_promptcard_changelist")
        form = ImportForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            upload = form.cleaned_data["file"]
            try:
                # The card matters only for a CSV of cases; YAML and JSON name their cards.
                card = form.cleaned_data["card"] if upload.name.lower().endswith(".csv") else None
                flags = {name: form.cleaned_data[name] for name in card_files.IMPORT_FLAGS}
                report = card_files.import_cards(
                    upload.read(card_files.MAX_UPLOAD_BYTES + 1),
                    filename=upload.name,
                    user=request.user,
                    card=card,
                    **flags,
                )
            except card_files.CardFileError as exc:
                for error in exc.errors:
                    form.add_error("file", error)
            else:
                self.message_user(request, report.summary(), messages.SUCCESS)
                for line in report.details():
                    self.message_user(request, line, messages.WARNING)
                return redirect("admin:testruns_promptcard_changelist")
        return render(
            request,
            "admin/testruns/promptcard/import.html",
            {
                **self.admin_site.each_context(request),
                "title": "Import cards and test cases",
                "form": form,
                "opts": self.model._meta,
            },
        )
