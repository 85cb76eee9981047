from __future__ import annotations

from django.urls import path

from testruns.live.consumers import DashboardConsumer, RunConsumer

websocket_urlpatterns = [
    path("ws/runs/<int:run_id>/", RunConsumer.as_asgi()),
    path("ws/dashboard/", DashboardConsumer.as_asgi()),
]
