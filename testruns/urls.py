from __future__ import annotations

from django.urls import path

from testruns import views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("launch/", views.launch, name="launch"),
    path("runs/<int:pk>/", views.run_detail, name="run-detail"),
    path("runs/<int:pk>/status.json", views.run_status, name="run-status"),
]
