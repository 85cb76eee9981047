"""Queue statistics and system resources, for people and programs deciding what to do."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from testruns.api.params import query_int
from testruns.api.serializers.operations import QueueStatsSerializer, SystemResourcesSerializer
from testruns.reporting import queue_stats


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
