from __future__ import annotations

from django.apps import AppConfig


class TestRunsConfig(AppConfig):
    name = "testruns"
    verbose_name = "Prompt Card Runner"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported once the app registry is ready (the actors' modules import models): this
        # registers the actors with the broker in every process, web ones included, so that
        # dispatch can send messages by actor name.
        from testruns import actors  # noqa: F401
