"""Schedules as the API reads and writes them: a card (by slug or id) or a tag, providers (by
name or id), a cron expression and time zone, and the run options with the bounds every
launch has (TestRun's validators, as on the launch page). Saved through the one service that
plans the next due time by the database's clock (engine.scheduling)."""

from __future__ import annotations

from django.db.models import Model
from rest_framework import serializers

from testruns.api.serializers.runs import setting_field
from testruns.api.serializers.shared import (
    CardField,
    ModelCleanMixin,
    ProviderField,
    ReferenceListField,
)
from testruns.engine import scheduling
from testruns.models import Schedule, ScheduleLaunch
from testruns.models.schedules import RUN_OPTIONS

MAX_PROVIDERS = 20


class ProviderListField(ReferenceListField):
    """Providers by name or id; shown as their ids."""

    def to_representation(self, data) -> list[int]:
        return [provider.pk for provider in data.all()]


class ScheduleSerializer(ModelCleanMixin, serializers.ModelSerializer):
    card = CardField(
        required=False, allow_null=True, help_text="The card to run, by slug (or id); or a tag."
    )
    providers = ProviderListField(
        child=ProviderField(),
        min_length=1,
        max_length=MAX_PROVIDERS,
        help_text="Providers by name (or id): one run per card and provider.",
    )
    owner = serializers.CharField(source="owner.username", read_only=True, allow_null=True)
    url = serializers.CharField(source="get_absolute_url", read_only=True)
    priority = setting_field("priority", help_text="Higher runs first.")
    max_concurrent_tests = setting_field("max_concurrent_tests")
    timeout_seconds = setting_field("timeout_seconds")
    max_retries = setting_field("max_retries")
    repeats = setting_field("repeats")

    class Meta:
        model = Schedule
        fields = [
            "id",
            "url",
            "name",
            "card",
            "card_tag",
            "providers",
            "owner",
            "cron",
            "time_zone",
            "paused",
            *RUN_OPTIONS,
            "next_due_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["next_due_at", "created_at", "updated_at"]

    def validate(self, attrs: dict) -> dict:
        user = self.context["request"].user
        if not user.has_perm("testruns.launch_testrun"):
            # Its runs are launched as its owner, who must be allowed to launch them.
            raise serializers.ValidationError("You may not launch runs, so neither may a schedule.")
        return super().validate(attrs)

    def candidate(self, attrs: dict) -> Model:
        # The providers are a many-to-many relation: set after the schedule is saved.
        return super().candidate({k: v for k, v in attrs.items() if k != "providers"})

    def create(self, validated_data: dict) -> Schedule:
        providers = validated_data.pop("providers")
        return scheduling.save_schedule(Schedule(**validated_data), providers=providers)

    def update(self, instance: Schedule, validated_data: dict) -> Schedule:
        providers = validated_data.pop("providers", None)
        for name, value in validated_data.items():
            setattr(instance, name, value)
        return scheduling.save_schedule(instance, providers=providers)


class ScheduleLaunchSerializer(serializers.ModelSerializer):
    runs = serializers.SerializerMethodField()

    class Meta:
        model = ScheduleLaunch
        fields = ["id", "due_at", "launched_at", "missed", "run_count", "error", "runs"]
        read_only_fields = fields

    def get_runs(self, launch: ScheduleLaunch) -> list[int]:
        return [run.pk for run in launch.runs.all()]
