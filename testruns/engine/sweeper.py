"""The safety net that runs in every worker process (in a thread of its own, apart from the
heartbeat): repairs what a crash or an outage left behind. Several sweepers at once are
harmless: every repair goes through the same locked gate functions as normal work."""

from __future__ import annotations

import logging

from django.db.models import F

from testruns.engine import admission, counters, dispatch, gate, recording, settling
from testruns.live import publish
from testruns.models import Semaphore, TestResult, TestRun

log = logging.getLogger(__name__)


def sweep() -> dict[str, int]:
    """0. Correct semaphore counters that drifted from their lease rows.
    1. Reclaim case leases whose holder stopped heartbeating; requeue those cases.
    2. Re-send admitted cases whose message never reached the broker.
    3. Finish runs whose every case is done (a crash between the last result and the finish).
    4. Fill free slots where waiters exist (a promotion lost to a crash).
    5. Tell pages about results that coalescing held back during a quiet spell.
    6. Settle finished runs nobody settled (counters, notifications), count the queue waits
       of runs that started, and re-send notifications whose message never went out."""
    report = {
        "recounted": len(gate.recount_in_use()),
        "reclaimed": admission.reclaim_expired_cases(),
        "resent": dispatch.resend_undispatched(),
        "finished": sum(
            recording.finish_run(run_id)
            for run_id in TestRun.objects.filter(
                status=TestRun.Status.RUNNING, done_count__gte=F("total_cases")
            ).values_list("pk", flat=True)
        ),
        "admitted_runs": len(admit_runs_if_room()),
        "admitted_cases": sum(len(admission.admit_cases(p)) for p in providers_with_room()),
        "announced": publish.flush_unannounced(),
        "settled": settling.settle_finished_runs(),
        "redelivered": dispatch.resend_undelivered(),
    }
    counters.count_started_runs()  # every sweep finds some while runs start: not worth a line
    if any(report.values()):
        log.info("sweep: %s", report)
    return report


def admit_runs_if_room() -> list[int]:
    runs = Semaphore.objects.filter(name=gate.RUNS, in_use__lt=F("limit")).exists()
    if runs and TestRun.objects.filter(status=TestRun.Status.QUEUED).exists():
        return admission.admit_runs()
    return []


def providers_with_room() -> list[int]:
    """Providers with a free slot and a pending case of a running run (checked without a
    lock; admit_cases re-checks under it)."""
    waiting = set(
        TestResult.objects.filter(
            status=TestResult.Status.PENDING,
            run__status=TestRun.Status.RUNNING,
            run__cancel_requested=False,
        )
        .values_list("run__provider_id", flat=True)
        .distinct()
    )
    with_room = []
    for provider_id in waiting:
        semaphore = Semaphore.objects.filter(name=gate.provider_semaphore(provider_id)).first()
        if semaphore and semaphore.in_use < min(
            semaphore.limit, int(semaphore.effective_limit or semaphore.limit)
        ):
            with_room.append(provider_id)
    return with_room
