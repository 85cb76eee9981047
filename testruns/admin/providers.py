"""Providers in the admin: local command providers for superusers only, the call semaphore
kept in step with max_concurrency, and a connection test."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError

from testruns.catalog import provider_rules
from testruns.engine import limits, providers
from testruns.models import Provider


class ProviderForm(forms.ModelForm):
    # Local servers (Ollama, vLLM, LM Studio, llama.cpp) usually speak plain http.
    base_url = forms.URLField(
        required=False,
        assume_scheme="http",
        help_text="For OpenAI-compatible servers, e.g. http://localhost:11434/v1 for Ollama.",
    )

    class Meta:
        model = Provider
        fields = "__all__"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "api_key_env" in self.fields:  # say the rule before it refuses a name
            self.fields["api_key_env"].help_text = (
                "The NAME of the environment variable that holds the key; never the key. "
                f"It must match {provider_rules.key_env_pattern().pattern} "
                "(PROVIDER_KEY_ENV_PATTERN) and not be one of this app's own settings."
            )

    def clean(self) -> dict:
        cleaned = super().clean()
        # Only a superuser may make the app run a program on the worker hosts.
        if not provider_rules.may_manage_provider(self.user, cleaned.get("kind")):
            raise ValidationError({"kind": provider_rules.COMMAND_PROVIDER_MESSAGE})
        return cleaned


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    form = ProviderForm
    list_display = ["name", "kind", "model", "max_concurrency", "prices", "enabled"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name", "model", "base_url"]
    actions = ["test_connection"]
    fieldsets = [
        (
            None,
            {"fields": ["name", "kind", "enabled", "model", "base_url", "api_key_env", "command"]},
        ),
        ("Calls", {"fields": ["parameters", "max_concurrency", "timeout_seconds"]}),
        ("Prices", {"fields": ["price_input_per_mtok", "price_output_per_mtok"]}),
    ]

    def get_form(self, request, obj=None, change=False, **kwargs) -> type[ProviderForm]:
        form = super().get_form(request, obj, change, **kwargs)
        form.user = request.user  # for clean(): who may choose the command kind
        return form

    def has_change_permission(self, request, obj=None) -> bool:
        if obj is not None and not provider_rules.may_manage_provider(request.user, obj):
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        return self.has_change_permission(request, obj) and super().has_delete_permission(
            request, obj
        )

    def save_model(self, request, obj, form, change) -> None:
        super().save_model(request, obj, form, change)
        limits.save_provider_limit(obj)

    @admin.display(description="$ / M tokens (in / out)")
    def prices(self, provider) -> str:
        return f"{provider.price_input_per_mtok:g} / {provider.price_output_per_mtok:g}"

    # It sends the provider's key to its base URL from the web process: only for those who
    # may change the provider anyway (and, for a local command, only superusers).
    @admin.action(description="Test connection", permissions=["change"])
    def test_connection(self, request, queryset) -> None:
        for provider in queryset:
            if not self.has_change_permission(request, provider):
                self.message_user(
                    request,
                    f"{provider.name}: you may not change this provider, so you may not test it.",
                    messages.ERROR,
                )
                continue
            try:
                answer = providers.test_connection(provider)
            except providers.ProviderError as exc:
                self.message_user(request, f"{provider.name}: failed: {exc}", messages.ERROR)
            else:
                self.message_user(
                    request, f"{provider.name}: answered {answer[:200]!r}", messages.SUCCESS
                )
