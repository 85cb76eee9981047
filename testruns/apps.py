from __future__ import annotations

from django.apps import AppConfig


class TestRunsConfig(AppConfig):
    name = "testruns"
    verbose_name = "Prompt Card Runner"
    default_auto_field = "django.db.models.BigAutoField"
