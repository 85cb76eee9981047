"""Dramatiq actors: thin adapters that take ids and call services."""

from __future__ import annotations

import dramatiq

from testruns import execution


@dramatiq.actor(queue_name="runs", max_retries=3, time_limit=6 * 60 * 60 * 1000)
def execute_run(run_id: int) -> None:
    if execution.claim_run(run_id):
        execution.execute_run(run_id)
