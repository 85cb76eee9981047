"""The domain: providers, prompt cards and their versions, test cases, runs, results, and the
rows behind the concurrency gate. Thin: behaviour lives in the service modules. A package so
that each family has a module of its own; Django finds the models through these imports.

May import: only the catalog's pure modules (assertions, prompts, provider rules) for
validation; everything else in the app imports the models, never the other way round."""

from __future__ import annotations

from testruns.models.catalog import (
    ENV_VAR_NAME,
    SIMULATOR_PARAMETERS,
    PromptCard,
    PromptVersion,
    Provider,
    TestCase,
    tag_list,
)
from testruns.models.counters import MetricCounter
from testruns.models.gate import (
    ADMISSION_LOCK_KEY,
    QUEUE_LOCK_KEY,
    RUNS_PER_USER_SEMAPHORE,
    RUNS_SEMAPHORE,
    Lease,
    Semaphore,
    WorkerHeartbeat,
    provider_semaphore,
)
from testruns.models.notifications import (
    DeliveryAttempt,
    NotificationDelivery,
    NotificationRule,
)
from testruns.models.reviews import Review
from testruns.models.runs import ResponseCache, TestResult, TestRun
from testruns.models.schedules import Schedule, ScheduleLaunch

__all__ = [
    "ADMISSION_LOCK_KEY",
    "ENV_VAR_NAME",
    "QUEUE_LOCK_KEY",
    "RUNS_PER_USER_SEMAPHORE",
    "RUNS_SEMAPHORE",
    "SIMULATOR_PARAMETERS",
    "DeliveryAttempt",
    "Lease",
    "MetricCounter",
    "NotificationDelivery",
    "NotificationRule",
    "PromptCard",
    "PromptVersion",
    "Provider",
    "ResponseCache",
    "Schedule",
    "ScheduleLaunch",
    "Review",
    "Semaphore",
    "TestCase",
    "TestResult",
    "TestRun",
    "WorkerHeartbeat",
    "provider_semaphore",
    "tag_list",
]
