"""Runs as the API shows them, and the launch requests that queue them. A launch request
is translated into launching.launch_runs' arguments; the bounds of the settings are
TestRun's fields' validators (engine.run_settings), as on the launch page and in the CLI."""

from __future__ import annotations

from django.db import models
from drf_spectacular.utils import OpenApiExample, extend_schema_serializer
from rest_framework import serializers

from testruns.api.serializers.shared import (
    BIG_INT,
    CardField,
    ProviderField,
    ReferenceListField,
)
from testruns.engine import run_settings
from testruns.live import snapshots
from testruns.models import TestResult, TestRun

MAX_BATCH_RUNS = 100
MAX_CASE_IDS = 10_000


def setting_field(name: str, **kwargs) -> serializers.Field:
    """Run setting `name` as the API takes it: the type and default of TestRun's field, and
    its bounds as validators (the model's own objects, hence its messages)."""
    float_field = isinstance(run_settings.model_field(name), models.FloatField)
    field_class = serializers.FloatField if float_field else serializers.IntegerField
    return field_class(
        default=run_settings.default(name),
        validators=run_settings.bounds(name).validators,
        **kwargs,
    )


class CardRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    slug = serializers.CharField()
    name = serializers.CharField()


class ProviderRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    model = serializers.CharField()
    kind = serializers.CharField()


class RunSerializer(serializers.ModelSerializer):
    card = CardRefSerializer(read_only=True)
    provider = ProviderRefSerializer(read_only=True)
    version = serializers.IntegerField(source="version.number", read_only=True)
    launched_by = serializers.CharField(
        source="launched_by.username", read_only=True, allow_null=True
    )
    url = serializers.CharField(source="get_absolute_url", read_only=True)
    queue_position = serializers.SerializerMethodField()

    class Meta:
        model = TestRun
        fields = [
            "id",
            "url",
            "card",
            "version",
            "provider",
            "launched_by",
            "status",
            "phase",
            "priority",
            "queue_position",
            "comparison_group",
            "max_concurrent_tests",
            "timeout_seconds",
            "stop_on_failure",
            "max_retries",
            "use_cache",
            "repeats",
            "grader_provider",
            "cancel_requested",
            "queued_at",
            "started_at",
            "finished_at",
            "error_message",
            "total_cases",
            "done_count",
            "passed_count",
            "failed_count",
            "error_count",
            "tokens_in",
            "tokens_out",
            "cost",
        ]
        read_only_fields = fields

    def get_queue_position(self, run: TestRun) -> int | None:
        """1-based place among all waiting runs; null once the run has started."""
        positions = self.context.get("queue_positions")
        if positions is not None:
            return positions.get(run.pk)
        return snapshots.queue_position(run)


class RunConfigSerializer(serializers.Serializer):
    """What a run does, as the launch page and the CLI set it."""

    version = serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=BIG_INT,
        help_text="The number of the card's version to run (as runs show it). Default: the "
        "latest. Only when launching one card.",
    )
    test_cases = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=BIG_INT),
        required=False,
        max_length=MAX_CASE_IDS,
        help_text="Ids of the card's test cases to run (disabled ones "
        "too). Default: every enabled case.",
    )
    tags = serializers.ListField(
        child=serializers.CharField(max_length=50),
        required=False,
        max_length=100,
        help_text="Run the enabled cases with any of these tags.",
    )
    priority = setting_field("priority", help_text="Higher runs first.")
    max_concurrent_tests = setting_field(
        "max_concurrent_tests", help_text="Cases of this run in flight at once."
    )
    timeout_seconds = setting_field("timeout_seconds", help_text="Per case (per provider call).")
    stop_on_failure = serializers.BooleanField(default=False)
    retry_failed = serializers.BooleanField(
        default=True,
        help_text="Retry provider calls that fail with 429, 5xx or a network "
        "error (false: max_retries is 0).",
    )
    max_retries = setting_field("max_retries")
    use_cache = serializers.BooleanField(default=False)
    repeats = setting_field(
        "repeats",
        help_text="A case passes when every repeat passes. With use_cache, only the first "
        "repeat may be answered from the cache.",
    )
    grader_provider = ProviderField(
        required=False,
        allow_null=True,
        help_text="The provider that grades llm-rubric assertions, by name or id. Default: "
        "the card's grader provider, else the run's own provider.",
    )

    def launch_arguments(self) -> dict:
        """The keyword arguments of launching.launch_runs (all but the user)."""
        data = dict(self.validated_data)
        if not data.pop("retry_failed"):
            data["max_retries"] = 0
        data["case_ids"] = data.pop("test_cases", None)
        return data


# Request examples for the docs page ("Try it out" sends the one chosen): the cards and the
# provider of the demo data `make run` seeds, so they queue runs as they stand (ids work too,
# but differ from one database to the next). tests/test_api.py posts every one of them.
LAUNCH_EXAMPLES = [
    OpenApiExample(
        "By slug and name",
        value={"card": "support-reply", "provider": "Simulator"},
        request_only=True,
    ),
    OpenApiExample(
        "With settings",
        value={
            "card": "summarise-ticket",
            "provider": "Simulator",
            "priority": 5,
            "max_concurrent_tests": 2,
            "timeout_seconds": 30,
            "repeats": 3,
            "use_cache": False,
        },
        request_only=True,
    ),
]
BATCH_EXAMPLES = [
    OpenApiExample(
        "Two cards on one provider",
        value={"cards": ["support-reply", "summarise-ticket"], "providers": ["Simulator"]},
        request_only=True,
    ),
    OpenApiExample(
        "Every demo card, high priority",
        value={
            "cards": ["support-reply", "summarise-ticket", "json-extract"],
            "providers": ["Simulator"],
            "priority": 10,
        },
        request_only=True,
    ),
]


@extend_schema_serializer(examples=LAUNCH_EXAMPLES)
class LaunchSerializer(RunConfigSerializer):
    card = CardField(help_text="The card's slug (or its id).")
    provider = ProviderField(help_text="The provider's name (or its id).")

    def launch_arguments(self) -> dict:
        data = super().launch_arguments()
        return data | {"cards": [data.pop("card")], "providers": [data.pop("provider")]}


@extend_schema_serializer(examples=BATCH_EXAMPLES)
class BatchLaunchSerializer(RunConfigSerializer):
    cards = ReferenceListField(
        child=CardField(),
        min_length=1,
        max_length=MAX_BATCH_RUNS,
        help_text="Cards by slug (or id).",
    )
    providers = ReferenceListField(
        child=ProviderField(),
        min_length=1,
        max_length=MAX_BATCH_RUNS,
        help_text="Providers by name (or id).",
    )

    def validate(self, attrs: dict) -> dict:
        attrs = super().validate(attrs)
        cards = list(dict.fromkeys(attrs["cards"]))
        providers = list(dict.fromkeys(attrs["providers"]))
        if len(cards) * len(providers) > MAX_BATCH_RUNS:
            raise serializers.ValidationError(
                f"At most {MAX_BATCH_RUNS} runs per batch (cards x providers)."
            )
        return attrs | {"cards": cards, "providers": providers}


class BatchResponseSerializer(serializers.Serializer):
    comparison_group = serializers.UUIDField(allow_null=True)
    runs = RunSerializer(many=True)


class CancelResponseSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    status = serializers.CharField()
    cancelled = serializers.BooleanField()


class ProgressSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    seq = serializers.IntegerField(help_text="The run's event sequence number.")
    status = serializers.ChoiceField(choices=TestRun.Status.choices)
    phase = serializers.ChoiceField(choices=TestRun.Phase.choices)
    queue_position = serializers.IntegerField(allow_null=True)
    queue_length = serializers.IntegerField(allow_null=True)
    total_cases = serializers.IntegerField()
    done_count = serializers.IntegerField()
    passed_count = serializers.IntegerField()
    failed_count = serializers.IntegerField()
    error_count = serializers.IntegerField()
    skipped_count = serializers.IntegerField()
    calls_done = serializers.IntegerField(help_text="Model calls made (each repeat is one).")
    calls_total = serializers.IntegerField(help_text="Model calls in all: cases x repeats.")
    percent_done = serializers.FloatField(help_text="Of the model calls.")
    waited_seconds = serializers.FloatField(allow_null=True)
    running_seconds = serializers.FloatField(allow_null=True)
    tokens_in = serializers.IntegerField()
    tokens_out = serializers.IntegerField()
    cost = serializers.FloatField()
    waiting_reasons = serializers.ListField(child=serializers.CharField())


class ResultSerializer(serializers.ModelSerializer):
    class Meta:
        model = TestResult
        fields = [
            "id",
            "position",
            "case",
            "case_name",
            "status",
            "variables",
            "prompt",
            "output",
            "assertion_results",
            "score",
            "latency_ms",
            "tokens_in",
            "tokens_out",
            "cost",
            "attempts",
            "retries",
            "repeat_passes",
            "repeat_results",
            "cached",
            "error",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields
