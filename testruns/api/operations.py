"""Queue statistics and system resources, for people and programs deciding what to do."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from testruns.api.params import query_int
from testruns.reporting import queue_stats


class SlotSerializer(serializers.Serializer):
    name = serializers.CharField()
    label = serializers.CharField()
    in_use = serializers.IntegerField()
    limit = serializers.IntegerField()


class LimitsSerializer(serializers.Serializer):
    max_concurrent_runs = serializers.IntegerField()
    runs_in_use = serializers.IntegerField()
    max_runs_per_user = serializers.IntegerField()
    max_queue_length = serializers.IntegerField(allow_null=True)
    slots = SlotSerializer(many=True)


class QueueStatsSerializer(serializers.Serializer):
    waiting = serializers.IntegerField()
    running = serializers.IntegerField()
    limits = LimitsSerializer()
    window_seconds = serializers.IntegerField()
    runs_started = serializers.IntegerField()
    mean_wait_seconds = serializers.FloatField(allow_null=True)
    p95_wait_seconds = serializers.FloatField(allow_null=True)
    runs_finished = serializers.IntegerField()
    throughput_runs_per_hour = serializers.FloatField()
    cases_finished = serializers.IntegerField()
    throughput_cases_per_minute = serializers.FloatField()
    run_error_rate = serializers.FloatField(allow_null=True)
    case_error_rate = serializers.FloatField(allow_null=True)
    waiting_reasons = serializers.ListField(child=serializers.CharField())


class HostSerializer(serializers.Serializer):
    cpu_percent = serializers.FloatField()
    memory_total_mb = serializers.FloatField()
    memory_available_mb = serializers.FloatField()
    load_average = serializers.ListField(child=serializers.FloatField())
    cpu_count = serializers.IntegerField()


class WorkerSerializer(serializers.Serializer):
    holder = serializers.CharField()
    hostname = serializers.CharField()
    pid = serializers.IntegerField()
    started_at = serializers.DateTimeField()
    last_seen = serializers.DateTimeField()
    seconds_since_heartbeat = serializers.FloatField()
    live = serializers.BooleanField()
    accepting = serializers.BooleanField()
    note = serializers.CharField()
    cpu_percent = serializers.FloatField()
    memory_available_mb = serializers.FloatField()
    load_average = serializers.FloatField()


class ResourceLimitsSerializer(serializers.Serializer):
    max_cpu_percent = serializers.FloatField(allow_null=True)
    min_free_memory_mb = serializers.FloatField(allow_null=True)


class SystemResourcesSerializer(serializers.Serializer):
    host = HostSerializer()
    limits = ResourceLimitsSerializer()
    host_pressure = serializers.CharField(allow_null=True)
    workers = WorkerSerializer(many=True)
    live_workers = serializers.IntegerField()
    accepting_workers = serializers.IntegerField()
    live_after_seconds = serializers.FloatField()


class QueueStatsView(APIView):
    @extend_schema(
        responses=QueueStatsSerializer,
        parameters=[
            OpenApiParameter(
                "window",
                OpenApiTypes.INT,
                description="Seconds of history for waits, throughput and "
                f"error rates (60 to {queue_stats.MAX_WINDOW_SECONDS}; default "
                f"{queue_stats.DEFAULT_WINDOW_SECONDS}).",
            )
        ],
    )
    def get(self, request: Request) -> Response:
        """Waiting and running runs, limits, queue wait (mean, p95), throughput, error rate,
        and why runs wait."""
        window = query_int(request, "window") or queue_stats.DEFAULT_WINDOW_SECONDS
        if not 60 <= window <= queue_stats.MAX_WINDOW_SECONDS:
            raise exceptions.ValidationError(
                {"window": [f"Between 60 and {queue_stats.MAX_WINDOW_SECONDS} seconds."]}
            )
        return Response(QueueStatsSerializer(queue_stats.queue_stats(window)).data)


class SystemResourcesView(APIView):
    @extend_schema(responses=SystemResourcesSerializer)
    def get(self, request: Request) -> Response:
        """This host's CPU, memory and load, the admission thresholds, and every worker with
        its last heartbeat and whether it takes new cases (and why not)."""
        return Response(SystemResourcesSerializer(queue_stats.system_resources()).data)
