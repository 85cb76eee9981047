from __future__ import annotations

from django.contrib import admin

from testruns.models import PromptCard, PromptVersion, Provider, Semaphore, TestCase, TestRun
from testruns.services import snapshot_version


class TestCaseInline(admin.StackedInline):
    model = TestCase
    extra = 0


@admin.register(PromptCard)
class PromptCardAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "owner", "updated_at"]
    search_fields = ["name", "slug", "description"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [TestCaseInline]

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        snapshot_version(obj, author=request.user)


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "model", "max_concurrency", "enabled"]


@admin.register(TestRun)
class TestRunAdmin(admin.ModelAdmin):
    list_display = ["id", "card", "provider", "status", "done_count", "total_cases", "queued_at"]
    list_filter = ["status"]


admin.site.register(PromptVersion)
admin.site.register(Semaphore)
