from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from testruns.ops.health import healthz
from testruns.ops.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("testruns.api.urls")),
    path("metrics", metrics_view, name="metrics"),
    path("healthz", healthz, name="healthz"),
    path("login/", auth_views.LoginView.as_view(template_name="login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", include("testruns.urls")),
]
