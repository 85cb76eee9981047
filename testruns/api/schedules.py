"""Schedules: create, read, change (pause and resume with `paused`) and delete them, and read
the due times they launched. Writes need the schedule model permissions (as in the admin) and
the permission to launch runs; each user sees their own schedules, or all with view_schedule."""

from __future__ import annotations

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from testruns.api.permissions import ModelPermissions
from testruns.api.serializers.schedules import ScheduleLaunchSerializer, ScheduleSerializer
from testruns.engine import scheduling
from testruns.models import Schedule


class ScheduleViewSet(viewsets.ModelViewSet):
    """Schedules of a card (or of every card with a tag) against providers, on a cron
    expression in a time zone; due times are launched by the workers, once each."""

    serializer_class = ScheduleSerializer
    permission_classes = [ModelPermissions]
    queryset = Schedule.objects.none()  # for the schema; get_queryset says whose

    def get_queryset(self) -> QuerySet[Schedule]:
        return scheduling.schedules_visible_to(self.request.user).order_by("name", "pk")

    def perform_create(self, serializer: ScheduleSerializer) -> None:
        serializer.save(owner=self.request.user)

    @extend_schema(responses={200: ScheduleLaunchSerializer(many=True)})
    @action(detail=True, methods=["get"])
    def launches(self, request: Request, pk=None) -> Response:
        """The due times it launched (or could not), newest first, a page at a time."""
        page = self.paginate_queryset(self.get_object().launches.prefetch_related("runs"))
        return self.get_paginated_response(ScheduleLaunchSerializer(page, many=True).data)
