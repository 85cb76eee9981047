"""Prompt versions in the admin: history, never edited or deleted. Inline on a card, newest
first, each linked to its page on the site (its whole prompt, the diff against the version
before, "Restore this version"); and a read-only list of all versions."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.urls import reverse
from django.utils.html import format_html
from django.utils.text import Truncator

from testruns.models import PromptVersion


class PromptVersionInline(admin.TabularInline):
    """The card's versions, newest first, each linked to its page on the site (its prompt in
    full and its diff against the version before, and "Restore this version")."""

    model = PromptVersion
    extra = 0
    can_delete = False
    fields = [
        "version",
        "created_at",
        "author",
        "change_note",
        "system_prompt_start",
        "template_start",
    ]
    readonly_fields = fields
    ordering = ["-number"]
    verbose_name_plural = "Version history (read-only; a version's page shows its diff)"
    PROMPT_CHARS = 120

    def get_queryset(self, request) -> QuerySet[PromptVersion]:
        return super().get_queryset(request).select_related("author")

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="version")
    def version(self, version) -> str:
        url = reverse("version", args=[version.card_id, version.number])
        return format_html('<a href="{}" class="version-link">v{}</a>', url, version.number)

    @admin.display(description="system prompt")
    def system_prompt_start(self, version) -> str:
        return Truncator(version.system_prompt).chars(self.PROMPT_CHARS) or "–"

    @admin.display(description="template")
    def template_start(self, version) -> str:
        return Truncator(version.template).chars(self.PROMPT_CHARS)


@admin.register(PromptVersion)
class PromptVersionAdmin(admin.ModelAdmin):
    """Versions are history: viewable, never edited or deleted."""

    list_display = ["card", "number", "author", "created_at", "change_note"]
    list_select_related = ["card", "author"]
    list_filter = [("card", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["card__name", "change_note"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
