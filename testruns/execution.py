"""Running a claimed test run: render, call the provider, record each result."""

from __future__ import annotations

import logging

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from testruns import events, providers
from testruns.models import TestResult, TestRun
from testruns.prompts import render_prompt

log = logging.getLogger(__name__)


def claim_run(run_id: int) -> bool:
    """queued -> running, once: a redelivered message finds the run already claimed."""
    with transaction.atomic():
        claimed = TestRun.objects.filter(pk=run_id, status=TestRun.Status.QUEUED).update(
            status=TestRun.Status.RUNNING, phase=TestRun.Phase.GENERATING,
            started_at=timezone.now(),
        )
        if claimed:
            events.record_run_event(run_id, "status", {"status": "running", "phase": "generating"})
            events.publish_queue_changed()
    return bool(claimed)


def execute_run(run_id: int) -> None:
    """Run every pending case of a running run, then finish it."""
    run = TestRun.objects.select_related("version", "provider").get(pk=run_id)
    if run.status != TestRun.Status.RUNNING:
        return
    for result in run.results.filter(status=TestResult.Status.PENDING).order_by("position"):
        execute_case(run, result)
    finish_run(run_id)


def execute_case(run: TestRun, result: TestResult) -> None:
    started = timezone.now()
    try:
        prompt = render_prompt(run.version.template, result.variables)
        completion = providers.complete(run.provider, system=run.version.system_prompt,
                                        prompt=prompt, timeout=run.timeout_seconds)
    except Exception as exc:  # any failure of one case is recorded; the run goes on
        record_result(run, result, status=TestResult.Status.ERROR, error=str(exc),
                      started_at=started)
        return
    record_result(
        run, result, status=TestResult.Status.PASSED, prompt=prompt, output=completion.text,
        latency_ms=completion.latency_ms, tokens_in=completion.tokens_in,
        tokens_out=completion.tokens_out,
        cost=providers.cost_of(run.provider, completion.tokens_in, completion.tokens_out),
        started_at=started,
    )


COUNTERS = {
    TestResult.Status.PASSED: "passed_count",
    TestResult.Status.FAILED: "failed_count",
    TestResult.Status.ERROR: "error_count",
}


def record_result(run: TestRun, result: TestResult, *, status: str, **fields) -> bool:
    """Write a case's outcome exactly once and bump the run's totals with it."""
    with transaction.atomic():
        written = TestResult.objects.filter(
            pk=result.pk, status__in=[TestResult.Status.PENDING, TestResult.Status.RUNNING]
        ).update(status=status, finished_at=timezone.now(), attempts=F("attempts") + 1, **fields)
        if not written:
            return False
        totals = {"done_count": F("done_count") + 1}
        if status in COUNTERS:
            totals[COUNTERS[status]] = F(COUNTERS[status]) + 1
        totals["tokens_in"] = F("tokens_in") + fields.get("tokens_in", 0)
        totals["tokens_out"] = F("tokens_out") + fields.get("tokens_out", 0)
        totals["cost"] = F("cost") + fields.get("cost", 0)
        TestRun.objects.filter(pk=run.pk).update(**totals)
        counts = TestRun.objects.values(
            "done_count", "passed_count", "failed_count", "error_count", "total_cases"
        ).get(pk=run.pk)
        events.record_run_event(run.pk, "progress", {
            **counts,
            "result": {"id": result.pk, "position": result.position, "case_name": result.case_name,
                       "status": status, "output": fields.get("output", ""),
                       "error": fields.get("error", ""),
                       "latency_ms": fields.get("latency_ms")},
        })
    return True


def finish_run(run_id: int) -> None:
    with transaction.atomic():
        run = TestRun.objects.select_for_update().get(pk=run_id)
        if run.status != TestRun.Status.RUNNING:
            return
        if run.error_count:
            run.status = TestRun.Status.ERROR
        elif run.failed_count:
            run.status = TestRun.Status.FAILED
        else:
            run.status = TestRun.Status.SUCCEEDED
        run.phase = TestRun.Phase.DONE
        run.finished_at = timezone.now()
        run.save(update_fields=["status", "phase", "finished_at"])
        events.record_run_event(run_id, "status", {"status": run.status, "phase": run.phase})
        events.publish_queue_changed()
    log.info("run finished", extra={"run_id": run_id})
