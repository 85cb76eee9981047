"""Runs: queue them (once per Idempotency-Key), follow them, cancel them."""

from __future__ import annotations

from django.db import transaction
from django.db.models import Case, IntegerField, QuerySet, Value, When
from django.http import HttpResponse
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from testruns.api import idempotency
from testruns.api.params import query_choice, query_reference
from testruns.api.permissions import RunPermissions
from testruns.api.protocol import Conflict
from testruns.api.serializers.runs import (
    BatchLaunchSerializer,
    BatchResponseSerializer,
    CancelResponseSerializer,
    LaunchSerializer,
    ProgressSerializer,
    ResultSerializer,
    RunConfigSerializer,
    RunSerializer,
)
from testruns.catalog import lookup
from testruns.engine import launching
from testruns.live import snapshots
from testruns.models import TestResult, TestRun
from testruns.reporting import access, formats, history, queue_stats

IDEMPOTENCY_HEADER = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    required=False,
    description="Any unique string (up to 255 printable ASCII characters). Retrying with the "
    "same key and body returns the runs the first request queued instead of "
    "queueing them again (answer header `Idempotent-Replayed: true`).",
)


# What a run's progress repeats from its snapshots.run_snapshot() state.
PROGRESS_FIELDS = (
    "id", "status", "phase", "queue_position", "total_cases", "done_count", "passed_count",
    "failed_count", "error_count", "waited_seconds", "running_seconds", "tokens_in",
    "tokens_out", "cost", "calls_done", "calls_total",
)  # fmt: skip


def queue_positions() -> dict[int, int]:
    """Run id -> 1-based place among all waiting runs, from one queue read."""
    return {
        run_id: index
        for index, (run_id, _) in enumerate(snapshots.queue_state()["waiting"], start=1)
    }


@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter("status", OpenApiTypes.STR, enum=list(TestRun.Status.values)),
            OpenApiParameter(
                "card", OpenApiTypes.STR, description="Runs of this card: its slug or id."
            ),
            OpenApiParameter(
                "provider", OpenApiTypes.STR, description="Runs on this provider: its name or id."
            ),
        ]
    ),
    create=extend_schema(
        request=LaunchSerializer, responses={201: RunSerializer}, parameters=[IDEMPOTENCY_HEADER]
    ),
    destroy=extend_schema(request=None, responses={200: CancelResponseSerializer}),
)
class RunViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Test runs the user may see: queue them, follow them, cancel them."""

    serializer_class = RunSerializer
    permission_classes = [RunPermissions]
    queryset = TestRun.objects.all()

    def get_queryset(self) -> QuerySet[TestRun]:
        runs = access.runs_visible_to(self.request.user).order_by("-queued_at", "-pk")
        if self.action == "list":
            runs = history.filter_runs(
                runs,
                status=query_choice(self.request, "status", list(TestRun.Status.values)),
                card=query_reference(self.request, "card", lookup.CARD),
                provider=query_reference(self.request, "provider", lookup.PROVIDER),
            )
        return runs

    def get_serializer_context(self) -> dict:
        context = super().get_serializer_context()
        if self.action in ("list", "retrieve", "active", "create", "batch"):
            context["queue_positions"] = queue_positions()
        return context

    def create(self, request: Request) -> Response:
        """Queue a run: 201 with its id, status and queue position; 429 while the queue is
        full."""
        runs, replayed = launch_idempotently(request, "runs", LaunchSerializer)
        run = runs[0] if runs else None
        if run is None:
            raise exceptions.NotFound("The run this Idempotency-Key queued is gone.")
        body = self.get_serializer(self.get_queryset().get(pk=run.pk)).data
        return created(body, replayed, location=reverse("api-run-detail", args=[run.pk]))

    @extend_schema(
        request=BatchLaunchSerializer,
        responses={201: BatchResponseSerializer},
        parameters=[IDEMPOTENCY_HEADER],
    )
    @action(detail=False, methods=["post"])
    def batch(self, request: Request) -> Response:
        """Queue one run per (card, provider) at once, all or none; they share a
        comparison group."""
        runs, replayed = launch_idempotently(request, "batch", BatchLaunchSerializer)
        fresh = self.get_queryset().filter(pk__in=[run.pk for run in runs]).order_by("pk")
        group = runs[0].comparison_group if runs else None
        body = {"comparison_group": group, "runs": self.get_serializer(fresh, many=True).data}
        return created(body, replayed)

    def destroy(self, request: Request, pk=None) -> Response:
        """Cancel a run that has not finished; its results so far are kept."""
        run = self.get_object()
        if run.is_finished or not launching.cancel_run(run, user=request.user):
            run.refresh_from_db(fields=["status"])
            raise Conflict(f"Run #{run.pk} has already finished ({run.status}).")
        run.refresh_from_db(fields=["status"])
        return Response({"id": run.pk, "status": run.status, "cancelled": True})

    @extend_schema(responses=ProgressSerializer)
    @action(detail=True, methods=["get"])
    def progress(self, request: Request, pk=None) -> Response:
        """Counts, queue place while waiting, and why the run is not moving if it is not."""
        snapshot = snapshots.run_snapshot(self.get_object(), result_limit=0)
        state, queue = snapshot["run"], snapshot["queue"]
        evaluated = state["passed_count"] + state["failed_count"] + state["error_count"]
        body = {
            **{key: state[key] for key in PROGRESS_FIELDS},
            "seq": snapshot["seq"],
            "queue_length": queue["waiting"] if queue else None,
            "skipped_count": max(0, state["done_count"] - evaluated),
            # In model calls (cases x repeats), as the pages show it.
            "percent_done": (
                min(100.0, 100.0 * state["calls_done"] / state["calls_total"])
                if state["calls_total"]
                else 100.0
            ),
            "waiting_reasons": queue_stats.run_waiting_reasons(snapshot),
        }
        return Response(ProgressSerializer(body).data)

    @extend_schema(
        responses=ResultSerializer(many=True),
        parameters=[
            OpenApiParameter("status", OpenApiTypes.STR, enum=list(TestResult.Status.values))
        ],
    )
    @action(detail=True, methods=["get"])
    def results(self, request: Request, pk=None) -> Response:
        """The run's results in case order, a page at a time."""
        results = self.get_object().results.order_by("position")
        if result_status := query_choice(request, "status", list(TestResult.Status.values)):
            results = results.filter(status=result_status)
        page = self.paginate_queryset(results)
        return self.get_paginated_response(ResultSerializer(page, many=True).data)

    @extend_schema(responses={200: OpenApiTypes.OBJECT})
    @action(detail=True, methods=["get"])
    def report(self, request: Request, pk=None) -> Response:
        """The whole run as JSON: what ran, totals, statistics and every result."""
        return Response(formats.run_json(self.get_object()))

    @extend_schema(responses={(200, "application/xml"): OpenApiTypes.STR})
    @action(detail=True, methods=["get"])
    def junit(self, request: Request, pk=None) -> HttpResponse:
        """The run as JUnit XML, for CI systems."""
        return HttpResponse(
            formats.junit_xml(self.get_object()), content_type="application/xml; charset=utf-8"
        )

    @extend_schema(responses=RunSerializer(many=True))
    @action(detail=False, methods=["get"])
    def active(self, request: Request) -> Response:
        """Runs that are running (first) or waiting (in queue order)."""
        runs = (
            access.runs_visible_to(request.user)
            .filter(status__in=[TestRun.Status.RUNNING, TestRun.Status.QUEUED])
            .annotate(
                waiting=Case(
                    When(status=TestRun.Status.QUEUED, then=Value(1)),
                    default=Value(0),
                    output_field=IntegerField(),
                )
            )
            .order_by("waiting", "-priority", "queued_at", "pk")
        )
        page = self.paginate_queryset(runs)
        return self.get_paginated_response(self.get_serializer(page, many=True).data)


def launch_idempotently(
    request: Request, scope: str, serializer_class: type[RunConfigSerializer]
) -> tuple[list[TestRun], bool]:
    """Translate the request into launching.launch_runs' arguments and queue, once per
    Idempotency-Key (when the request has one): returns the runs and whether they are an
    earlier request's. A LaunchError (no cases, a full queue) becomes a 400 on the request's
    field, or a 429, in api.protocol."""
    launch = serializer_class(data=request.data, context={"request": request})
    launch.is_valid(raise_exception=True)

    def queue() -> list[TestRun]:
        return launching.launch_runs(user=request.user, **launch.launch_arguments())

    key = request.headers.get("Idempotency-Key")
    if key is None:
        return queue(), False
    claim = idempotency.claim(user_id=request.user.pk, key=key, scope=scope, payload=request.data)
    if claim.replay is not None:
        runs = access.runs_visible_to(request.user).filter(pk__in=claim.replay)
        return list(runs.order_by("pk")), True
    try:
        with transaction.atomic():
            runs = queue()
    except BaseException:
        idempotency.release(claim)
        raise
    idempotency.complete(claim, [run.pk for run in runs])
    return runs, False


def created(body: dict, replayed: bool, *, location: str | None = None) -> Response:
    headers = {"Location": location} if location else {}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return Response(body, status=status.HTTP_201_CREATED, headers=headers)
