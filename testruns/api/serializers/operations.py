"""Queue statistics and system resources, as the API shows them (read only)."""

from __future__ import annotations

from rest_framework import serializers


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
