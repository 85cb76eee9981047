"""Demo data for `make run`: a simulated provider and a few cards with test cases.
Idempotent: running it again updates the same rows instead of adding more."""

from __future__ import annotations

from django.db import transaction

from testruns.catalog.cards import snapshot_version
from testruns.models import PromptCard, Provider, Semaphore, TestCase

DEMO_CARDS = [
    {
        "slug": "support-reply",
        "name": "Support reply",
        "description": "Answers a customer question politely and names the product.",
        "tags": ["support"],
        "system_prompt": "You are a friendly support agent.",
        "template": "Customer asks about {{ product }}: {{ question }}",
        "cases": [
            (
                "Refund question",
                {"product": "Widget Pro", "question": "Can I get a refund?"},
                [{"type": "icontains", "value": "widget pro"}],
            ),
            (
                "Shipping question",
                {"product": "Gadget", "question": "When will it ship?"},
                [{"type": "contains", "value": "ship"}],
            ),
            (
                "Warranty question",
                {"product": "Gizmo", "question": "Is there a warranty?"},
                [{"type": "contains-any", "value": ["warranty", "guarantee"]}],
            ),
        ],
    },
    {
        "slug": "summarise-ticket",
        "name": "Summarise ticket",
        "description": "One-line summary of a support ticket.",
        "tags": ["support", "summary"],
        "system_prompt": "Summarise in one sentence.",
        "template": "Ticket: {{ ticket }}",
        "cases": [
            (
                "Login failure",
                {"ticket": "User cannot log in after password reset."},
                [{"type": "icontains", "value": "log in"}],
            ),
            (
                "Slow dashboard",
                {"ticket": "The dashboard takes 30 seconds to load."},
                [{"type": "word-count", "value": {"max": 40}}],
            ),
        ],
    },
    {
        "slug": "json-extract",
        "name": "Extract order as JSON",
        "description": "Turns an order sentence into JSON.",
        "tags": ["extraction"],
        "system_prompt": "Answer with JSON only.",
        "template": "Extract the order: {{ sentence }}",
        "cases": [
            (
                "Two apples",
                {"sentence": "I want two apples"},
                [{"type": "contains", "value": "apples"}],
            ),
            (
                "Three pears",
                {"sentence": "Three pears please"},
                [{"type": "contains", "value": "pears"}],
            ),
        ],
    },
]


@transaction.atomic
def seed_demo(max_concurrent_runs: int) -> None:
    Provider.objects.update_or_create(
        name="Simulator",
        defaults={
            "kind": Provider.Kind.SIMULATOR,
            "model": "sim-1",
            "parameters": {"latency_ms": 400, "jitter_ms": 300, "error_rate": 0},
            "max_concurrency": 8,
        },
    )
    Semaphore.objects.get_or_create(name="runs", defaults={"limit": max_concurrent_runs})
    for spec in DEMO_CARDS:
        card, _ = PromptCard.objects.update_or_create(
            slug=spec["slug"],
            defaults={
                key: spec[key]
                for key in ("name", "description", "tags", "system_prompt", "template")
            },
        )
        snapshot_version(card, note="Demo data")
        for order, (name, variables, assertions) in enumerate(spec["cases"]):
            TestCase.objects.update_or_create(
                card=card,
                name=name,
                defaults={"variables": variables, "assertions": assertions, "order": order},
            )
