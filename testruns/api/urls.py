"""URLs of the API under /api/. DRF's views handle authentication themselves (session or
token) and opt out of LoginRequiredMiddleware, so a token client gets a 401, not the login
page. The docs page is a page for people: it keeps the redirect to the login page."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from testruns.api import catalog, operations, runs, schedules

router = DefaultRouter()
router.include_format_suffixes = False
router.register("cards", catalog.CardViewSet, basename="api-card")
router.register("versions", catalog.VersionViewSet, basename="api-version")
router.register("cases", catalog.TestCaseViewSet, basename="api-case")
router.register("providers", catalog.ProviderViewSet, basename="api-provider")
router.register("runs", runs.RunViewSet, basename="api-run")
router.register("schedules", schedules.ScheduleViewSet, basename="api-schedule")

urlpatterns = [
    path("queue/stats/", operations.QueueStatsView.as_view(), name="api-queue-stats"),
    path(
        "system/resources/", operations.SystemResourcesView.as_view(), name="api-system-resources"
    ),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path(
        "docs/",
        login_required(SpectacularSwaggerView.as_view(url_name="api-schema")),
        name="api-docs",
    ),
    *router.urls,
]
