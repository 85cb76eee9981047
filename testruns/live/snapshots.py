"""What live pages and the run and dashboard JSON show: the waiting queue (with a version),
a run's place in it, a run page's snapshot and its further result pages, the slots in use,
and the dashboard.

A page reads a snapshot once (on connect, on resync, or when it polls without a WebSocket)
and then applies the deltas `live.publish` sends; the shapes of both are `live.wire`'s.
"""

from __future__ import annotations

import json

from django.db import connection, transaction
from django.db.models import Q, QuerySet

from testruns.live import wire
from testruns.models import RUNS_SEMAPHORE, Provider, Semaphore, TestRun, provider_semaphore

# Rows a live run page holds; the rest of a large run is paged over HTTP.
LIVE_ROWS = 100
# Queue entries a dashboard lists; the rest are counted.
DASHBOARD_QUEUE_ROWS = 100
# Serialises queue reads, so that a higher version never holds older state.
QUEUE_LOCK_KEY = 7_301_042
# Runs that ended on their own (not cancelled): the base of estimates, trends and baselines.
COMPLETED_RUNS = (TestRun.Status.SUCCEEDED, TestRun.Status.FAILED, TestRun.Status.ERROR)


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
        cursor.execute(_QUEUE_STATE_SQL, [RUNS_SEMAPHORE])
        version, waiting, running, slots = cursor.fetchone()
    return {
        "version": version,
        "waiting": json.loads(waiting),
        "running": json.loads(running),
        "slots": json.loads(slots) if slots else [0, 0],
    }


# The places in the latest broadcast asked about, as (version, {run id: place}).
_places: tuple[int | None, dict[int, int]] = (None, {})


def position_in(queue: dict, run_id: int) -> int | None:
    """1-based place of a run in a queue_state() (None when it is not waiting).

    Every waiting page of a web process asks about the same broadcast, so its places are
    indexed once per version rather than searched once per page (500 pages, 500 runs: a
    quarter of a million comparisons per slot freed). A version names one read of the
    queue, so equal versions hold equal queues."""
    global _places
    version, places = _places
    if version is None or version != queue["version"]:
        places = {waiting_id: index + 1 for index, (waiting_id, _) in enumerate(queue["waiting"])}
        _places = (queue["version"], places)
    return places.get(run_id)


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
SELECT {wire.RUN_STATE_COLUMNS}, extract(epoch FROM now() - queued_at)::float8,
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
        state = wire.run_state(row[: len(wire.RUN_STATE)])
        since_queued, waited, running_for = row[len(wire.RUN_STATE) :]
        cursor.execute(
            f"SELECT {wire.result_columns()} FROM testruns_testresult "
            "WHERE run_id = %s AND status = ANY(%s) ORDER BY position DESC LIMIT %s",
            [run.pk, list(wire.DONE), result_limit],
        )
        results = [wire.result_row(values) for values in reversed(cursor.fetchall())]
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
    statuses = [status] if status in wire.DONE else list(wire.DONE)
    page = max(1, page)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM testruns_testresult WHERE run_id = %s AND status = ANY(%s)",
            [run.pk, statuses],
        )
        total = cursor.fetchone()[0]
        cursor.execute(
            f"SELECT {wire.result_columns()} FROM testruns_testresult WHERE run_id = %s "
            "AND status = ANY(%s) ORDER BY position LIMIT %s OFFSET %s",
            [run.pk, statuses, per_page, (page - 1) * per_page],
        )
        rows = [wire.result_row(values) for values in cursor.fetchall()]
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
    names = {provider_semaphore(p.pk): p.name for p in Provider.objects.only("id", "name")}
    slots = []
    for semaphore in Semaphore.objects.filter(
        Q(name=RUNS_SEMAPHORE) | Q(name__startswith="provider:")
    ).order_by("name"):
        if semaphore.name != RUNS_SEMAPHORE and semaphore.name not in names:
            continue
        slots.append(
            {
                "name": semaphore.name,
                "label": "Runs" if semaphore.name == RUNS_SEMAPHORE else names[semaphore.name],
                "in_use": semaphore.in_use,
                "limit": semaphore.limit,
            }
        )
    slots.sort(key=lambda slot: slot["name"] != RUNS_SEMAPHORE)
    return slots


def run_summary(run: TestRun) -> dict:
    """A run as the dashboard lists it (counts, never results)."""
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
        "calls_done": run.calls_done,
        "calls_total": run.calls_total,
        "passed_count": run.passed_count,
        "failed_count": run.failed_count,
        "error_count": run.error_count,
    }


def dashboard_state(visible: QuerySet[TestRun]) -> dict:
    """Slots, the running runs among `visible`, the whole waiting queue (details only for
    runs in `visible`) and recent finished runs, with the queue version it is current as of.

    `visible` is the runs the user may see, `reporting.access.runs_visible_to(user)`: the
    entry point applies the access rule, as it does before asking for a run_snapshot."""
    queue = queue_state()
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
