"""Runs: queue them (once per Idempotency-Key), follow them, cancel them."""

from __future__ import annotations

from collections.abc import Callable

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
from testruns.api.params import query_choice, query_int
from testruns.api.permissions import RunPermissions
from testruns.api.protocol import Conflict
from testruns.api.serializers import (
    BatchLaunchSerializer,
    BatchResponseSerializer,
    CancelResponseSerializer,
    LaunchSerializer,
    ProgressSerializer,
    ResultSerializer,
    RunSerializer,
)
from testruns.engine import services
from testruns.models import PromptCard, Provider, TestCase, TestResult, TestRun
from testruns.reporting import formats, queue_stats, selectors

IDEMPOTENCY_HEADER = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    required=False,
    description="Any unique string (up to 255 printable ASCII characters). Retrying with the "
    "same key and body returns the runs the first request queued instead of "
    "queueing them again (answer header `Idempotent-Replayed: true`).",
)


# What a run's progress repeats from its selectors.run_snapshot() state.
PROGRESS_FIELDS = (
    "id", "status", "phase", "queue_position", "total_cases", "done_count", "passed_count",
    "failed_count", "error_count", "waited_seconds", "running_seconds", "tokens_in",
    "tokens_out", "cost",
)  # fmt: skip


def queue_positions() -> dict[int, int]:
    """Run id -> 1-based place among all waiting runs, from one queue read."""
    return {
        run_id: index
        for index, (run_id, _) in enumerate(selectors.queue_state()["waiting"], start=1)
    }


@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter("status", OpenApiTypes.STR, enum=list(TestRun.Status.values)),
            OpenApiParameter("card", OpenApiTypes.INT),
            OpenApiParameter("provider", OpenApiTypes.INT),
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
        runs = selectors.runs_visible_to(self.request.user).order_by("-queued_at", "-pk")
        if self.action == "list":
            runs = selectors.filter_runs(
                runs,
                status=query_choice(self.request, "status", list(TestRun.Status.values)),
                card=query_int(self.request, "card"),
                provider=query_int(self.request, "provider"),
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
        launch = LaunchSerializer(data=request.data, context={"request": request})
        launch.is_valid(raise_exception=True)
        config = launch.run_config()
        card, provider = config.pop("card"), config.pop("provider")
        case_ids, tags = config.pop("case_ids"), config.pop("tags", None)
        check_enabled([provider])

        def queue() -> list[TestRun]:
            cases = select_cases_or_400(card, case_ids=case_ids, tags=tags)
            return [
                services.launch_run(
                    card=card, provider=provider, user=request.user, cases=cases, **config
                )
            ]

        runs, replayed = launch_idempotently(request, "runs", queue)
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
        launch = BatchLaunchSerializer(data=request.data, context={"request": request})
        launch.is_valid(raise_exception=True)
        check_enabled(launch.validated_data["providers"])
        config = launch.run_config()
        # A LaunchError (no cases, a full queue) becomes a 400 or 429 in api.protocol.
        runs, replayed = launch_idempotently(
            request, "batch", lambda: services.launch_runs(user=request.user, **config)
        )
        fresh = self.get_queryset().filter(pk__in=[run.pk for run in runs]).order_by("pk")
        group = runs[0].comparison_group if runs else None
        body = {"comparison_group": group, "runs": self.get_serializer(fresh, many=True).data}
        return created(body, replayed)

    def destroy(self, request: Request, pk=None) -> Response:
        """Cancel a run that has not finished; its results so far are kept."""
        run = self.get_object()
        if run.is_finished or not services.cancel_run(run, user=request.user):
            run.refresh_from_db(fields=["status"])
            raise Conflict(f"Run #{run.pk} has already finished ({run.status}).")
        run.refresh_from_db(fields=["status"])
        return Response({"id": run.pk, "status": run.status, "cancelled": True})

    @extend_schema(responses=ProgressSerializer)
    @action(detail=True, methods=["get"])
    def progress(self, request: Request, pk=None) -> Response:
        """Counts, queue place while waiting, and why the run is not moving if it is not."""
        snapshot = selectors.run_snapshot(self.get_object(), result_limit=0)
        state, queue = snapshot["run"], snapshot["queue"]
        evaluated = state["passed_count"] + state["failed_count"] + state["error_count"]
        body = {
            **{key: state[key] for key in PROGRESS_FIELDS},
            "seq": snapshot["seq"],
            "queue_length": queue["waiting"] if queue else None,
            "skipped_count": max(0, state["done_count"] - evaluated),
            "percent_done": (
                100.0 * state["done_count"] / state["total_cases"]
                if state["total_cases"]
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
            selectors.runs_visible_to(request.user)
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


def check_enabled(providers: list[Provider]) -> None:
    disabled = [provider.name for provider in providers if not provider.enabled]
    if disabled:
        raise exceptions.ValidationError(
            {"provider": [f"Provider {name} is disabled." for name in disabled]}
        )


def select_cases_or_400(card: PromptCard, **selection) -> list[TestCase]:
    try:
        return services.select_cases(card, **selection)
    except services.LaunchError as exc:
        field = "test_cases" if selection.get("case_ids") else "tags"
        raise exceptions.ValidationError({field: [str(exc)]}) from None


def launch_idempotently(
    request: Request, scope: str, queue: Callable[[], list[TestRun]]
) -> tuple[list[TestRun], bool]:
    """Queue once per Idempotency-Key (when the request has one): returns the runs and
    whether they are an earlier request's."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return queue(), False
    claim = idempotency.claim(user_id=request.user.pk, key=key, scope=scope, payload=request.data)
    if claim.replay is not None:
        runs = selectors.runs_visible_to(request.user).filter(pk__in=claim.replay)
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
