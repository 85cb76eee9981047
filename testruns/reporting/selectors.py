"""Reads with access rules or non-trivial queries. Authorization for runs lives here once:
views and consumers look runs up through `runs_visible_to` / `get_run_for_user`."""

from __future__ import annotations

import json
from dataclasses import dataclass

from django.db import connection, transaction
from django.db.models import Aggregate, F, FloatField, OuterRef, Q, QuerySet, Subquery, Window
from django.db.models.functions import RowNumber

from testruns.engine import gate
from testruns.live import events
from testruns.models import Provider, Semaphore, TestResult, TestRun

# Rows a live run page holds; the rest of a large run is paged over HTTP.
LIVE_ROWS = 100
# Queue entries a dashboard lists; the rest are counted.
DASHBOARD_QUEUE_ROWS = 100
# Serialises queue reads, so that a higher version never holds older state.
QUEUE_LOCK_KEY = 7_301_042
EVALUATED = (TestResult.Status.PASSED, TestResult.Status.FAILED, TestResult.Status.ERROR)
COMPLETED_RUNS = (TestRun.Status.SUCCEEDED, TestRun.Status.FAILED, TestRun.Status.ERROR)


# --- Access --------------------------------------------------------------------------------


def runs_visible_to(user) -> QuerySet[TestRun]:
    runs = TestRun.objects.select_related("card", "provider", "version", "launched_by")
    if not user.is_authenticated:
        return runs.none()
    if user.has_perm("testruns.view_testrun"):
        return runs
    return runs.filter(launched_by=user)


def get_run_for_user(user, pk) -> TestRun | None:
    try:
        return runs_visible_to(user).get(pk=pk)
    except (TestRun.DoesNotExist, ValueError, TypeError):
        return None


def can_cancel(user, run: TestRun) -> bool:
    """For a run the user may see (looked up through get_run_for_user)."""
    return not run.is_finished and user.has_perm("testruns.cancel_testrun")


# --- The queue -----------------------------------------------------------------------------

_QUEUE_STATE_SQL = """
SELECT pg_current_xact_id()::text::bigint,
       COALESCE((SELECT json_agg(json_build_array(id, priority)
                                 ORDER BY priority DESC, queued_at, id)
                 FROM testruns_testrun WHERE status = 'queued'), '[]')::text,
       COALESCE((SELECT json_agg(id ORDER BY id)
                 FROM testruns_testrun WHERE status = 'running'), '[]')::text,
       (SELECT json_build_array(in_use, "limit") FROM testruns_semaphore WHERE name = %s)::text
"""


def queue_state() -> dict:
    """The waiting runs in admission order (priority desc, queued_at, id) as [id, priority]
    pairs, the running run ids and the run slots [in use, limit], with a version.

    Nothing private: no card, user or output. Reads take an advisory lock and a fresh
    transaction id as their version, so versions follow the order of the reads: a page keeps
    the highest version it has seen and drops broadcasts that overtook each other."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [QUEUE_LOCK_KEY])
        cursor.execute(_QUEUE_STATE_SQL, [gate.RUNS])
        version, waiting, running, slots = cursor.fetchone()
    return {
        "version": version,
        "waiting": json.loads(waiting),
        "running": json.loads(running),
        "slots": json.loads(slots) if slots else [0, 0],
    }


def position_in(queue: dict, run_id: int) -> int | None:
    """1-based place of a run in a queue_state() (None when it is not waiting)."""
    for index, (waiting_id, _) in enumerate(queue["waiting"]):
        if waiting_id == run_id:
            return index + 1
    return None


def queue_position(run: TestRun) -> int | None:
    """1-based place among waiting runs (priority first, then queue time)."""
    if run.status != TestRun.Status.QUEUED:
        return None
    return position_in(queue_state(), run.pk)


def recent_run_seconds(sample: int = 20) -> float | None:
    """Mean duration of the latest completed runs: the base of a waiting page's estimate."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT avg(extract(epoch FROM finished_at - started_at))::float8 FROM ("
            "SELECT started_at, finished_at FROM testruns_testrun WHERE status = ANY(%s) "
            "AND started_at IS NOT NULL AND finished_at IS NOT NULL ORDER BY id DESC LIMIT %s"
            ") recent",
            [list(COMPLETED_RUNS), sample],
        )
        return cursor.fetchone()[0]


def queue_view(queue: dict, run_id: int) -> dict:
    """What a waiting page shows about the queue, from one queue_state()."""
    return {
        "version": queue["version"],
        "position": position_in(queue, run_id),
        "waiting": len(queue["waiting"]),
        "slots": queue["slots"],
    }


# --- Live run page -------------------------------------------------------------------------

_RUN_STATE_SQL = f"""
SELECT {events.RUN_STATE_COLUMNS}, extract(epoch FROM now() - queued_at)::float8,
       extract(epoch FROM started_at - queued_at)::float8,
       extract(epoch FROM COALESCE(finished_at, now()) - started_at)::float8
FROM testruns_testrun WHERE id = %s
"""


def run_snapshot(run: TestRun, *, result_limit: int = LIVE_ROWS) -> dict:
    """Everything a run page shows, with the sequence number it is current as of: the run's
    state, its queue place while it waits, and its latest finished results by position.

    The run is read before its results: a result announced after `seq` may also be in the
    list, and the page de-duplicates rows by id."""
    with connection.cursor() as cursor:
        cursor.execute(_RUN_STATE_SQL, [run.pk])
        row = cursor.fetchone()
        state = dict(zip(events.RUN_STATE, row[: len(events.RUN_STATE)], strict=True))
        since_queued, waited, running_for = row[len(events.RUN_STATE) :]
        cursor.execute(
            f"SELECT {events.result_columns()} FROM testruns_testresult "
            "WHERE run_id = %s AND status = ANY(%s) ORDER BY position DESC LIMIT %s",
            [run.pk, list(events.DONE), result_limit],
        )
        results = [events.result_row(values) for values in reversed(cursor.fetchall())]
    seq = state.pop("seq")
    queue = None
    if state["status"] == TestRun.Status.QUEUED:
        queue = queue_view(queue_state(), run.pk) | {
            "waited_seconds": since_queued,
            "recent_run_seconds": recent_run_seconds(),
        }
    return {
        "type": "snapshot",
        "seq": seq,
        "run": {
            "id": run.pk,
            **state,
            "queue_position": queue["position"] if queue else None,
            "waited_seconds": since_queued if waited is None else waited,
            "running_seconds": running_for,
        },
        "queue": queue,
        "results": results,
    }


def result_page(run: TestRun, *, page: int, per_page: int = 50, status: str | None = None) -> dict:
    """Finished results of a run by position, one page at a time (rows as events carry
    them): what the live page fetches beyond the rows it keeps."""
    statuses = [status] if status in events.DONE else list(events.DONE)
    page = max(1, page)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM testruns_testresult WHERE run_id = %s AND status = ANY(%s)",
            [run.pk, statuses],
        )
        total = cursor.fetchone()[0]
        cursor.execute(
            f"SELECT {events.result_columns()} FROM testruns_testresult WHERE run_id = %s "
            "AND status = ANY(%s) ORDER BY position LIMIT %s OFFSET %s",
            [run.pk, statuses, per_page, (page - 1) * per_page],
        )
        rows = [events.result_row(values) for values in cursor.fetchall()]
    return {
        "page": page,
        "per_page": per_page,
        "total": total,
        "pages": max(1, -(-total // per_page)),
        "results": rows,
    }


# --- Dashboard -----------------------------------------------------------------------------


def slot_usage() -> list[dict]:
    """The run slots and every provider's call slots, in use and limit."""
    names = {gate.provider_semaphore(p.pk): p.name for p in Provider.objects.only("id", "name")}
    slots = []
    for semaphore in Semaphore.objects.filter(
        Q(name=gate.RUNS) | Q(name__startswith="provider:")
    ).order_by("name"):
        if semaphore.name != gate.RUNS and semaphore.name not in names:
            continue
        slots.append(
            {
                "name": semaphore.name,
                "label": "Runs" if semaphore.name == gate.RUNS else names[semaphore.name],
                "in_use": semaphore.in_use,
                "limit": semaphore.limit,
            }
        )
    slots.sort(key=lambda slot: slot["name"] != gate.RUNS)
    return slots


def run_summary(run: TestRun) -> dict:
    return {
        "id": run.pk,
        "url": run.get_absolute_url(),
        "card": run.card.name,
        "version": run.version.number,
        "provider": str(run.provider),
        "launched_by": run.launched_by.get_username() if run.launched_by else "",
        "status": run.status,
        "phase": run.phase,
        "priority": run.priority,
        "total_cases": run.total_cases,
        "done_count": run.done_count,
        "passed_count": run.passed_count,
        "failed_count": run.failed_count,
        "error_count": run.error_count,
    }


def dashboard_state(user) -> dict:
    """Slots, the user's running runs, the whole waiting queue (details only for runs the
    user may see) and recent finished runs, with the queue version it is current as of."""
    queue = queue_state()
    visible = runs_visible_to(user)
    shown = queue["waiting"][:DASHBOARD_QUEUE_ROWS]
    details = {run.pk: run for run in visible.filter(pk__in=[pk for pk, _ in shown])}
    waiting = [
        {
            "id": pk,
            "priority": priority,
            "position": index + 1,
            "run": run_summary(details[pk]) if pk in details else None,
        }
        for index, (pk, priority) in enumerate(shown)
    ]
    running = visible.filter(status=TestRun.Status.RUNNING).order_by("started_at", "pk")
    recent = visible.filter(status__in=TestRun.FINISHED).order_by("-finished_at", "-pk")[:10]
    return {
        "type": "snapshot",
        "version": queue["version"],
        "slots": slot_usage(),
        "waiting": waiting,
        "waiting_count": len(queue["waiting"]),
        "running": [run_summary(run) for run in running],
        "recent": [run_summary(run) for run in recent],
    }


def visible_running_ids(user, candidates: list[int] | None = None) -> set[int]:
    runs = runs_visible_to(user).filter(status=TestRun.Status.RUNNING)
    if candidates is not None:
        runs = runs.filter(pk__in=candidates)
    return set(runs.values_list("pk", flat=True))


# --- History -------------------------------------------------------------------------------


class Percentile(Aggregate):
    """PostgreSQL's percentile_cont(fraction) WITHIN GROUP (ORDER BY expression)."""

    function = "percentile_cont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression, fraction: float, **extra):
        super().__init__(expression, fraction=float(fraction), **extra)


def latency_percentile(fraction: float):
    """A subquery for a run's latency percentile over its finished cases."""
    return Subquery(
        TestResult.objects.filter(run=OuterRef("pk"), latency_ms__isnull=False)
        .values("run")
        .annotate(p=Percentile("latency_ms", fraction))
        .values("p"),
        output_field=FloatField(),
    )


def filter_runs(
    runs: QuerySet[TestRun],
    *,
    card=None,
    provider=None,
    status=None,
    launcher=None,
    since=None,
    until=None,
) -> QuerySet[TestRun]:
    if card:
        runs = runs.filter(card=card)
    if provider:
        runs = runs.filter(provider=provider)
    if status:
        runs = runs.filter(status=status)
    if launcher:
        runs = runs.filter(launched_by=launcher)
    if since:
        runs = runs.filter(queued_at__date__gte=since)
    if until:
        runs = runs.filter(queued_at__date__lte=until)
    return runs


def card_trends(
    runs: QuerySet[TestRun], card_ids: list[int], *, points: int = 30
) -> dict[int, list[dict]]:
    """Per card, its latest `points` completed runs among `runs`, oldest first, with pass
    rate and p95 latency: what the history page draws."""
    latest = (
        runs.filter(card_id__in=card_ids, status__in=COMPLETED_RUNS, finished_at__isnull=False)
        .annotate(
            nth=Window(RowNumber(), partition_by=[F("card_id")], order_by=F("finished_at").desc()),
            p95=latency_percentile(0.95),
        )
        .filter(nth__lte=points)
        .order_by("card_id", "finished_at")
        .values(
            "pk", "card_id", "finished_at", "passed_count", "failed_count", "error_count", "p95"
        )
    )
    trends: dict[int, list[dict]] = {card_id: [] for card_id in card_ids}
    for row in latest:
        evaluated = row["passed_count"] + row["failed_count"] + row["error_count"]
        trends[row["card_id"]].append(
            {
                "run_id": row["pk"],
                "finished_at": row["finished_at"],
                "p95": row["p95"],
                "pass_rate": row["passed_count"] / evaluated if evaluated else None,
            }
        )
    return trends


# --- Reports -------------------------------------------------------------------------------


def run_statistics(run: TestRun) -> dict:
    """Pass rate (over evaluated cases: skipped ones do not count), latency percentiles,
    tokens, cost, cost per passing case and queue wait."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FILTER (WHERE status = 'passed'), "
            "count(*) FILTER (WHERE status = ANY(%s)), "
            "count(*) FILTER (WHERE status = 'skipped'), "
            "percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms), "
            "percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms), "
            "COALESCE(sum(tokens_in), 0), COALESCE(sum(tokens_out), 0), "
            "COALESCE(sum(cost), 0) FROM testruns_testresult WHERE run_id = %s",
            [list(EVALUATED), run.pk],
        )
        passed, evaluated, skipped, p50, p95, tokens_in, tokens_out, cost = cursor.fetchone()
        cursor.execute(
            "SELECT extract(epoch FROM COALESCE(started_at, finished_at, now()) "
            "- queued_at)::float8, extract(epoch FROM finished_at - started_at)"
            "::float8 FROM testruns_testrun WHERE id = %s",
            [run.pk],
        )
        queue_wait, duration = cursor.fetchone()
    return {
        "passed": passed,
        "evaluated": evaluated,
        "skipped": skipped,
        "pass_rate": passed / evaluated if evaluated else None,
        "p50_ms": p50,
        "p95_ms": p95,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cost": cost,
        "cost_per_pass": cost / passed if passed else None,
        "queue_wait_seconds": queue_wait,
        "duration_seconds": duration,
    }


def baseline_for(user, run: TestRun) -> TestRun | None:
    """The card's pinned baseline, else the previous completed run of the same card and
    provider; only among runs the user may see."""
    visible = runs_visible_to(user)
    pinned = run.card.baseline_run_id
    if pinned and pinned != run.pk:
        baseline = visible.filter(pk=pinned).first()
        if baseline is not None:
            return baseline
    return (
        visible.filter(
            card=run.card_id,
            provider=run.provider_id,
            status__in=COMPLETED_RUNS,
            queued_at__lt=run.queued_at,
        )
        .exclude(pk=run.pk)
        .order_by("-queued_at", "-pk")
        .first()
    )


def case_key(case_id: int | None, case_name: str) -> str:
    """Results of different runs line up by test case (by name once the case is gone)."""
    return f"c{case_id}" if case_id is not None else f"n:{case_name}"


@dataclass
class CaseChange:
    key: str
    position: int
    case_name: str
    before: str
    after: str


def changes_since(baseline: TestRun, run: TestRun) -> dict[str, list[CaseChange]]:
    """Regressions (passed in the baseline, not now) and fixes (the reverse)."""
    before = {
        case_key(c, n): s
        for c, n, s in baseline.results.values_list("case_id", "case_name", "status")
    }
    regressions, fixes = [], []
    for case_id, name, position, status in run.results.values_list(
        "case_id", "case_name", "position", "status"
    ).order_by("position"):
        key = case_key(case_id, name)
        old = before.get(key)
        if old is None or status not in EVALUATED or old not in EVALUATED:
            continue
        change = CaseChange(key, position, name, old, status)
        if old == TestResult.Status.PASSED and status != TestResult.Status.PASSED:
            regressions.append(change)
        elif old != TestResult.Status.PASSED and status == TestResult.Status.PASSED:
            fixes.append(change)
    return {"regressions": regressions, "fixes": fixes}


def side_by_side(runs: list[TestRun], *, differences_only: bool = False) -> list[dict]:
    """Cases as rows, runs as columns: [{"key", "case_name", "cells": [result|None, ...],
    "differs"}], in case order. Loads statuses first and detail only for the rows asked
    for, so the caller pages the list and fills in `cells` with `fill_cells`."""
    rows: dict[str, dict] = {}
    for column, run in enumerate(runs):
        for case_id, name, position, status in run.results.values_list(
            "case_id", "case_name", "position", "status"
        ):
            key = case_key(case_id, name)
            row = rows.setdefault(
                key,
                {
                    "key": key,
                    "case_name": name,
                    "position": position,
                    "statuses": [None] * len(runs),
                },
            )
            row["statuses"][column] = status
    ordered = sorted(rows.values(), key=lambda r: (r["position"], r["case_name"]))
    for row in ordered:
        row["differs"] = len(set(row["statuses"])) > 1
    return [row for row in ordered if row["differs"]] if differences_only else ordered


def fill_cells(runs: list[TestRun], rows: list[dict]) -> None:
    """Load the results behind one page of side_by_side() rows (one query per run)."""
    keys = {row["key"] for row in rows}
    by_key: dict[tuple[int, str], TestResult] = {}
    for run in runs:
        case_ids = [int(k[1:]) for k in keys if k.startswith("c")]
        names = [k[2:] for k in keys if k.startswith("n:")]
        for result in run.results.filter(
            Q(case_id__in=case_ids) | Q(case_id=None, case_name__in=names)
        ):
            by_key[(run.pk, case_key(result.case_id, result.case_name))] = result
    for row in rows:
        row["cells"] = [by_key.get((run.pk, row["key"])) for run in runs]
