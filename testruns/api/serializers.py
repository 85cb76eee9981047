"""Translating API input and output. Validation of stored objects is the models' own
(`full_clean()`), so the API rejects exactly what the admin and imports reject, with the same
message on the same field; launch input is checked here and by the services."""

from __future__ import annotations

import copy

from django.core.exceptions import NON_FIELD_ERRORS
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Model
from rest_framework import serializers
from rest_framework.settings import api_settings

from testruns.models import PromptCard, PromptVersion, Provider, TestCase, TestResult, TestRun
from testruns.reporting import selectors

MAX_PRIORITY = 100  # as the launch page and the admin allow
MAX_BATCH_RUNS = 100
MAX_CASE_IDS = 10_000
BIG_INT = 2**63 - 1


def model_errors(exc: DjangoValidationError) -> dict | list:
    """A Django ValidationError as DRF's field -> messages mapping."""
    if not hasattr(exc, "error_dict"):
        return {api_settings.NON_FIELD_ERRORS_KEY: exc.messages}
    return {
        api_settings.NON_FIELD_ERRORS_KEY if field == NON_FIELD_ERRORS else field: messages
        for field, messages in exc.message_dict.items()
    }


class ModelCleanMixin:
    """After field validation, apply the input to a copy of the object and run the model's
    full_clean(): its clean() and unique checks decide, with their messages."""

    def validate(self, attrs: dict) -> dict:
        attrs = super().validate(attrs)  # type: ignore[misc]
        candidate = self.candidate(attrs)
        try:
            candidate.full_clean()
        except DjangoValidationError as exc:
            raise serializers.ValidationError(model_errors(exc)) from None
        return attrs

    def candidate(self, attrs: dict) -> Model:
        instance = self.instance  # type: ignore[attr-defined]
        candidate = copy.copy(instance) if instance is not None else self.Meta.model()  # type: ignore[attr-defined]
        for name, value in attrs.items():
            setattr(candidate, name, value)
        return candidate


# --- Cards, versions, test cases ------------------------------------------------------------


class VisibleRunField(serializers.PrimaryKeyRelatedField):
    """A run id, among the runs the requesting user may see."""

    def get_queryset(self):
        return selectors.runs_visible_to(self.context["request"].user)


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
        run = attrs.get("baseline_run")
        if run is not None and (self.instance is None or run.card_id != self.instance.pk):
            raise serializers.ValidationError({"baseline_run": "Pick a run of this card."})
        return super().validate(attrs)

    def candidate(self, attrs: dict) -> Model:
        return super().candidate({k: v for k, v in attrs.items() if k != "change_note"})

    # The change note belongs to the version the view snapshots after saving, not the card.
    def create(self, validated_data: dict) -> PromptCard:
        validated_data.pop("change_note", None)
        return super().create(validated_data)

    def update(self, instance: PromptCard, validated_data: dict) -> PromptCard:
        validated_data.pop("change_note", None)
        return super().update(instance, validated_data)


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

COMMAND_KIND_MESSAGE = "Only superusers may create or change local command providers."


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

    def to_internal_value(self, data):
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
        if kind == Provider.Kind.COMMAND and not self.context["request"].user.is_superuser:
            raise serializers.ValidationError({"kind": COMMAND_KIND_MESSAGE})
        return super().validate(attrs)


# --- Runs -----------------------------------------------------------------------------------


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
        return selectors.queue_position(run)


class RunConfigSerializer(serializers.Serializer):
    """What a run does, as the launch page and the CLI set it."""

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
    priority = serializers.IntegerField(
        default=0, min_value=-MAX_PRIORITY, max_value=MAX_PRIORITY, help_text="Higher runs first."
    )
    max_concurrent_tests = serializers.IntegerField(
        default=4, min_value=1, max_value=1000, help_text="Cases of this run in flight at once."
    )
    timeout_seconds = serializers.FloatField(
        default=60, min_value=0.1, max_value=86_400, help_text="Per case (per provider call)."
    )
    stop_on_failure = serializers.BooleanField(default=False)
    retry_failed = serializers.BooleanField(
        default=True,
        help_text="Retry provider calls that fail with 429, 5xx or a network "
        "error (false: max_retries is 0).",
    )
    max_retries = serializers.IntegerField(default=2, min_value=0, max_value=20)
    use_cache = serializers.BooleanField(default=False)
    repeats = serializers.IntegerField(
        default=1,
        min_value=1,
        max_value=100,
        help_text="A case passes when every repeat passes. With use_cache, only the first "
        "repeat may be answered from the cache.",
    )
    grader_provider = serializers.PrimaryKeyRelatedField(
        queryset=Provider.objects.all(),
        required=False,
        allow_null=True,
        help_text="The provider that grades llm-rubric assertions. Default: the card's "
        "grader provider, else the run's own provider.",
    )

    def validate(self, attrs: dict) -> dict:
        if attrs.get("test_cases") and attrs.get("tags"):
            raise serializers.ValidationError(
                {"tags": "Choose the cases by id or by tag, not both."}
            )
        return attrs

    def run_config(self) -> dict:
        """The keyword arguments of services.launch_run / launch_runs."""
        data = dict(self.validated_data)
        retry = data.pop("retry_failed")
        if not retry:
            data["max_retries"] = 0
        data["case_ids"] = data.pop("test_cases", None)
        return data


class LaunchSerializer(RunConfigSerializer):
    card = serializers.PrimaryKeyRelatedField(queryset=PromptCard.objects.all())
    provider = serializers.PrimaryKeyRelatedField(queryset=Provider.objects.all())


class BatchLaunchSerializer(RunConfigSerializer):
    cards = serializers.ListField(
        child=serializers.PrimaryKeyRelatedField(queryset=PromptCard.objects.all()),
        min_length=1,
        max_length=MAX_BATCH_RUNS,
    )
    providers = serializers.ListField(
        child=serializers.PrimaryKeyRelatedField(queryset=Provider.objects.all()),
        min_length=1,
        max_length=MAX_BATCH_RUNS,
    )

    def validate(self, attrs: dict) -> dict:
        attrs = super().validate(attrs)
        cards = list(dict.fromkeys(attrs["cards"]))
        providers = list(dict.fromkeys(attrs["providers"]))
        if len(cards) * len(providers) > MAX_BATCH_RUNS:
            raise serializers.ValidationError(
                f"At most {MAX_BATCH_RUNS} runs per batch (cards x providers)."
            )
        if attrs.get("test_cases") and len(cards) > 1:
            raise serializers.ValidationError(
                {"test_cases": "Test case ids belong to one card; use tags for several cards."}
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
    percent_done = serializers.FloatField()
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
            "repeat_passes",
            "repeat_results",
            "cached",
            "error",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields
