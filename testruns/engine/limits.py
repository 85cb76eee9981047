"""Limits are data: the gate's rows start from settings and providers, and every change of a
limit (admin, API, a provider's max_concurrency) goes through set_limit here."""

from __future__ import annotations

from django.conf import settings

from testruns.engine import admission, gate
from testruns.models import Provider


def ensure_semaphores(provider: Provider) -> None:
    """The gate's rows start from settings and the provider; after that they are data."""
    gate.ensure_semaphore(gate.RUNS, settings.MAX_CONCURRENT_RUNS)
    gate.ensure_semaphore(gate.RUNS_PER_USER, settings.MAX_RUNS_PER_USER)
    gate.ensure_semaphore(gate.provider_semaphore(provider.pk), provider.max_concurrency)


def save_provider_limit(provider: Provider) -> None:
    """Keep the provider's call semaphore in step with its max_concurrency."""
    set_limit(gate.provider_semaphore(provider.pk), provider.max_concurrency)


def set_limit(name: str, limit: int) -> list[int]:
    """Change a semaphore's limit (and only that); raising it promotes waiters at once.
    A semaphore that has no row yet (a new one from the admin, a provider never launched on)
    gets one with this limit first. Returns the ids of runs it promoted."""
    gate.ensure_semaphore(name, limit)
    return admission.set_limit(name, limit)
