"""Cards, their versions and test cases, and providers, as the API reads and writes them."""

from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.db.models import Model, QuerySet
from rest_framework import serializers

from testruns.api.serializers.shared import ModelCleanMixin, model_errors
from testruns.catalog import cards, provider_rules
from testruns.models import PromptCard, PromptVersion, Provider, TestCase, TestRun
from testruns.reporting import access

# --- Cards, versions, test cases ------------------------------------------------------------


class VisibleRunField(serializers.PrimaryKeyRelatedField):
    """A run id, among the runs the requesting user may see."""

    def get_queryset(self) -> QuerySet[TestRun]:
        return access.runs_visible_to(self.context["request"].user)


class CardSerializer(ModelCleanMixin, serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True, allow_null=True)
    baseline_run = VisibleRunField(required=False, allow_null=True)
    latest_version = serializers.IntegerField(read_only=True, allow_null=True)
    case_count = serializers.IntegerField(read_only=True)
    change_note = serializers.CharField(
        write_only=True,
        required=False,
        allow_blank=True,
        max_length=300,
        help_text="Why the prompt changed; kept with the new version.",
    )

    class Meta:
        model = PromptCard
        fields = [
            "id",
            "name",
            "slug",
            "description",
            "tags",
            "owner",
            "system_prompt",
            "template",
            "baseline_run",
            "grader_provider",
            "latest_version",
            "case_count",
            "change_note",
            "created_at",
            "updated_at",
        ]

    def validate(self, attrs: dict) -> dict:
        if "baseline_run" in attrs:  # refused before anything is written, in the pin's words
            try:
                cards.check_baseline(self.instance, attrs["baseline_run"])
            except DjangoValidationError as exc:
                raise serializers.ValidationError(model_errors(exc)) from None
        return super().validate(attrs)

    def candidate(self, attrs: dict) -> Model:
        return super().candidate({k: v for k, v in attrs.items() if k != "change_note"})

    # Saving goes through the one save-card service, which snapshots the version (the change
    # note belongs to it, not to the card).
    def create(self, validated_data: dict) -> PromptCard:
        note = validated_data.pop("change_note", "")
        # A new card has no runs, so validate() let only an empty baseline through.
        validated_data.pop("baseline_run", None)
        card = PromptCard(**validated_data)
        cards.save_card(card, user=self.context["request"].user, note=note)
        return card

    def update(self, instance: PromptCard, validated_data: dict) -> PromptCard:
        """Save the card's fields, then pin or unpin its baseline through the one service
        that does (as the report page does)."""
        note = validated_data.pop("change_note", "")
        pinning = "baseline_run" in validated_data
        run = validated_data.pop("baseline_run", None)
        with transaction.atomic():
            for name, value in validated_data.items():
                setattr(instance, name, value)
            cards.save_card(instance, user=self.context["request"].user, note=note)
            if pinning:
                cards.pin_baseline(instance, run)
        return instance


class VersionSerializer(serializers.ModelSerializer):
    author = serializers.CharField(source="author.username", read_only=True, allow_null=True)

    class Meta:
        model = PromptVersion
        fields = [
            "id",
            "card",
            "number",
            "system_prompt",
            "template",
            "author",
            "change_note",
            "created_at",
        ]
        read_only_fields = fields


class TestCaseSerializer(ModelCleanMixin, serializers.ModelSerializer):
    class Meta:
        model = TestCase
        fields = [
            "id",
            "card",
            "name",
            "variables",
            "assertions",
            "threshold",
            "tags",
            "enabled",
            "order",
        ]


# --- Providers ------------------------------------------------------------------------------


class ProviderSerializer(ModelCleanMixin, serializers.ModelSerializer):
    """A provider names the environment variable that holds its key (`api_key_env`); a key
    itself is never accepted, stored or shown."""

    class Meta:
        model = Provider
        fields = [
            "id",
            "name",
            "kind",
            "enabled",
            "model",
            "base_url",
            "api_key_env",
            "command",
            "parameters",
            "max_concurrency",
            "timeout_seconds",
            "price_input_per_mtok",
            "price_output_per_mtok",
            "created_at",
            "updated_at",
        ]

    def to_internal_value(self, data) -> dict:
        if isinstance(data, dict) and "api_key" in data:
            raise serializers.ValidationError(
                {
                    "api_key": [
                        "Keys are never sent to or stored by this app. Put the key in an "
                        "environment variable of the workers and set api_key_env to its name."
                    ]
                }
            )
        return super().to_internal_value(data)

    def validate(self, attrs: dict) -> dict:
        # Only a superuser may make the app run a program on the worker hosts (as in the admin).
        kind = attrs.get("kind", self.instance.kind if self.instance else None)
        if not provider_rules.may_manage_provider(self.context["request"].user, kind):
            raise serializers.ValidationError({"kind": provider_rules.COMMAND_PROVIDER_MESSAGE})
        return super().validate(attrs)
