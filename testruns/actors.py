"""Dramatiq actors: thin adapters that take ids and call services: running a case, and
delivering a notification.

Dramatiq's defaults (10-minute time limit, 20 retries with backoff up to days) suit neither
a test case nor a user waiting for a report. A case's own retries happen inside (with
Retry-After and jitter); a message is retried only for infrastructure failures (database
gone away), a few times and quickly. A redelivered message is harmless: it claims the
case's lease or finds it taken and returns.

The time limit (CASE_TIME_LIMIT_SECONDS, 30 minutes by default) is a last resort: Dramatiq
raises TimeLimitExceeded inside the thread, and execution records the case it was running as
an ERROR and gives back its slot before the exception goes on. A thread keeps handing cases
to itself for only a fraction of it (execution.handover_budget_seconds).
"""

from __future__ import annotations

import logging

import dramatiq

from testruns.engine import execution
from testruns.engine.worker_identity import holder_id, host_pressure, may_keep_cases
from testruns.notify import delivering

log = logging.getLogger(__name__)

BUSY_HOST_DELAY_MS = 2_000


@dramatiq.actor(
    queue_name="cases",
    max_retries=3,
    min_backoff=500,
    max_backoff=5_000,
    time_limit=int(execution.case_time_limit_seconds() * 1000),
)
def execute_case(result_id: int) -> None:
    if (reason := host_pressure()) is not None:
        # Resource-aware admission: a busy host leaves the case to the others (or to itself
        # later); the case keeps its slot meanwhile, and the sweeper re-queues it if no
        # host takes it before its lease runs out.
        log.info("host busy (%s); case %s goes back to the broker", reason, result_id)
        execute_case.send_with_options(args=(result_id,), delay=BUSY_HOST_DELAY_MS)
        return
    execution.run_admitted_case(result_id, holder_id(), keep_going=may_keep_cases)


# A notice's own retries (a receiver's 500, a timeout) are the delivery's, with its backoff
# and log (notify.delivering); a message is retried only when the database was away.
@dramatiq.actor(queue_name="notifications", max_retries=3, min_backoff=1_000, max_backoff=10_000)
def deliver_notification(delivery_id: int) -> None:
    delivering.deliver(delivery_id)
