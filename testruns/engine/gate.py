"""The gate: counting semaphores held in PostgreSQL rows. SQL only: its functions take ids,
change rows, and return what they admitted; telling pages and sending messages is
admission's (testruns.engine.admission), after commit.

Three levels share one mechanism:
- "runs": runs in flight, globally (optionally also per launching user, "runs-per-user");
- "provider:<id>": model calls in flight to one provider across all runs;
- a run's own `max_concurrent_tests`: its cases in flight (counted under its provider's lock,
  because all of a run's cases go to that one provider).

Waiters are not rows of their own: waiting runs are queued TestRuns, waiting cases are
pending TestResults of running runs. Admission is by promotion: whoever frees or adds
capacity (launch, release, cancel, sweeper, limit change) locks the semaphore row and
promotes the head of the queue (priority desc, queued_at, id) into the free slots, in the
same transaction. Nothing polls for a slot and a waiting run holds no worker thread.

A transaction locks one semaphore row, or two in name order (cancel: "provider:<id>" before
"runs"), so there is no lock order to get wrong. The row is locked first, in its own
statement: under READ COMMITTED the next statement takes a fresh snapshot, which then sees
everything the previous holder committed. `Semaphore.in_use` is kept equal to the number of
its lease rows by changing both in the same statement, so taking and giving back a slot need
no COUNT. Lease times come from the database clock (now()), never a worker's. The SQL lives
in gate.sql beside this file, one named query each.

This module passes the style guide's 400 lines on purpose: it is the one place that takes and
gives back slots, and every caller of a semaphore comes through it; split, the rule "lock
first, in one fixed order" would have to be kept in several files.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction

from testruns.models import RUNS_PER_USER_SEMAPHORE, RUNS_SEMAPHORE, provider_semaphore

log = logging.getLogger(__name__)

# The names are the models' (one place); callers of the gate read them from here too.
RUNS = RUNS_SEMAPHORE
RUNS_PER_USER = RUNS_PER_USER_SEMAPHORE


def _load_queries(path: Path) -> dict[str, str]:
    """gate.sql's queries by name: each starts at a `-- name: <name>` line."""
    queries: dict[str, str] = {}
    for chunk in re.split(r"^-- name: ", path.read_text(), flags=re.M)[1:]:
        name, _, body = chunk.partition("\n")
        lines = [line for line in body.splitlines() if not line.startswith("-- ")]
        queries[name.strip()] = "\n".join(lines).strip()
    return queries


SQL = _load_queries(Path(__file__).with_name("gate.sql"))


def lease_ttl() -> float:
    return float(settings.LEASE_TTL_SECONDS)


def _rows(sql: str, params: dict | list | None = None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


# --- Semaphores ----------------------------------------------------------------------------


def ensure_semaphore(name: str, limit: int) -> None:
    _rows(SQL["ensure_semaphore"], [name, limit])


def set_limit(name: str, limit: int) -> None:
    """Change a limit (only the limit). Admission promotes waiters into a raised one."""
    with transaction.atomic():
        _rows(SQL["set_limit"], [limit, name])


def _lock(name: str) -> tuple[int, int, int, float | None]:
    """Lock the semaphore row; returns (id, limit, in_use, effective_limit). A row that is
    missing (deleted in the admin while it held no lease) comes back with its configured
    limit, so admission never stops on it."""
    rows = _rows(SQL["lock"], [name])
    if not rows:
        _recreate(name)
        rows = _rows(SQL["lock"], [name])
    if not rows:
        raise LookupError(f"semaphore {name!r} does not exist")
    return rows[0]


def _recreate(name: str) -> None:
    if name == RUNS:
        ensure_semaphore(name, settings.MAX_CONCURRENT_RUNS)
    elif name == RUNS_PER_USER:
        ensure_semaphore(name, settings.MAX_RUNS_PER_USER)
    elif name.startswith("provider:"):
        _rows(SQL["recreate_provider_semaphore"], [name, int(name.split(":", 1)[1])])
    log.warning("semaphore %s was missing and has been created again", name)


def lock_runs() -> tuple:
    return _lock(RUNS)


def lock_provider(provider_id: int) -> tuple:
    return _lock(provider_semaphore(provider_id))


def _delete_leases(where: str, params: dict) -> None:
    _rows(SQL["delete_leases"].format(where=where), params)


# --- Runs ----------------------------------------------------------------------------------


class PromotedRun(NamedTuple):
    run_id: int
    provider_id: int


def admit_runs() -> list[PromotedRun]:
    """Promote the head of the run queue into free run slots."""
    with transaction.atomic():
        return promote_runs(_lock(RUNS))


def promote_runs(locked: tuple) -> list[PromotedRun]:
    """With "runs" locked (`locked` is its row): in one statement, pick up to
    `limit - in_use` queued runs in queue order, skipping runs whose launcher is at the
    per-user limit, mark them running, insert their leases and add them to in_use."""
    sem_id, limit, in_use, _ = locked
    if in_use >= limit:
        return []
    rows = _rows(
        SQL["admit_runs"], {"sem": sem_id, "free": limit - in_use, "per_user": RUNS_PER_USER}
    )
    return [PromotedRun(*row) for row in rows]


def release_run(run_id: int) -> list[PromotedRun]:
    """Inside the caller's transaction, after it locked "runs" (and any provider row before
    it, by name order): give back the run's slot and promote the next runs."""
    _delete_leases("run_id = %(run)s AND result_id IS NULL", {"run": run_id})
    return promote_runs(_lock(RUNS))


class FinishedRun(NamedTuple):
    status: str | None  # the run's final status; None if it was not a running run all done
    promoted: list[PromotedRun]


def finish_run(run_id: int) -> FinishedRun:
    """Inside the caller's transaction (which may already hold provider rows, not "runs"):
    close a running run whose every case is done, with its final status from its totals,
    give back its slot and promote the next runs. pcr_close_case does the same for a run's
    last case; this is for the sweeper and for a "runs" row that had to be created again."""
    _lock(RUNS)
    row = _rows(SQL["finish_run"], {"run": run_id, "runs": RUNS, "per_user": RUNS_PER_USER})[0]
    return _finished(*row)


def _finished(status: str | None, promoted: list | str) -> FinishedRun:
    if isinstance(promoted, str):  # jsonb arrives as text from Django's psycopg connection
        promoted = json.loads(promoted)
    return FinishedRun(status, [PromotedRun(*p) for p in promoted])


# --- Cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Admitted:
    result_id: int
    lease_id: int
    holder: str = ""  # "" waits for a worker to claim it; else it was kept for that holder
    run_id: int | None = None
    # For a case kept by close_case: the fields running it reads (execution.CASE_FIELDS).
    case: dict | None = None


def admit_cases_locked(
    provider_id: int, locked: tuple | None = None, *, keeper: str = ""
) -> list[Admitted]:
    """Promote pending cases of running runs on this provider into its free call slots.
    Inside a transaction that holds (or may take) only this provider's row:

    1. Lock "provider:<id>" unless `locked` is its row as the caller last read it under the
       lock (saving a round trip); take its limit, in_use and AIMD ceiling.
    2. In one statement: per running run (priority desc, queued_at), take its first pending
       cases up to its own room (max_concurrent_tests minus its cases in flight), up to the
       provider's free slots; mark them running, insert their leases (the first one held by
       `keeper` when given), add them to in_use."""
    sem_id, limit, in_use, effective = locked or _lock(provider_semaphore(provider_id))
    ceiling = min(limit, int(effective)) if effective is not None else limit
    if in_use >= ceiling:
        return []
    rows = _rows(
        SQL["admit_cases"],
        {
            "sem": sem_id,
            "provider": provider_id,
            "free": ceiling - in_use,
            "ttl": lease_ttl(),
            "keeper": keeper,
        },
    )
    return [Admitted(*row) for row in rows]


def claim_case(result_id: int, holder: str) -> int | None:
    """Take over an admitted case's lease for this worker; None if it is not ours to run
    (already claimed by another delivery, reclaimed after expiry, or cancelled)."""
    rows = _rows(SQL["claim_case"], [holder, lease_ttl(), result_id])
    return rows[0][0] if rows else None


class GivenBack(NamedTuple):
    locked: tuple  # the provider's row as it now is, for admitting the next cases
    held: bool  # whether the lease was still there: if not, the case is no longer ours


def give_back_case(provider_id: int, lease_id: int, *, succeeded: bool) -> GivenBack:
    """First step of a case's closing transaction: lock the provider's row by giving back the
    call slot (one statement). A success also grows the provider's AIMD ceiling back towards
    its limit.

    `held` is the fence: a lease that is gone was reclaimed (its holder looked dead: cut off,
    or stalled past the TTL) or cancelled, and the case may be running elsewhere by now, so
    its holder must write nothing. Reclaim and cancel delete leases under the same row lock,
    so the answer cannot change before this transaction ends."""
    grow = SQL["grow_ceiling"] if succeeded else ""
    *locked, released = _rows(
        SQL["release_case"].format(grow=grow),
        {"lease": lease_id, "name": provider_semaphore(provider_id)},
    )[0]
    return GivenBack(tuple(locked), released > 0)


# The result columns a case's outcome may set (pcr_close_case writes these and only these).
OUTCOME_COLUMNS = frozenset(
    {
        "prompt",
        "output",
        "assertion_results",
        "score",
        "latency_ms",
        "tokens_in",
        "tokens_out",
        "cost",
        "attempts",
        "retries",
        "repeat_passes",
        "repeat_results",
        "cached",
        "error",
    }
)


@dataclass(frozen=True)
class Closed:
    held: bool  # the fence: False when the lease was gone, and nothing was written
    written: bool  # the outcome was written (the result was still `running`)
    complete: bool  # that was the run's last case
    event_due: bool  # the run's last event is older than the progress interval
    admitted: list[Admitted]
    # When complete: the run finished in the same call (status None if the "runs" row was
    # missing, and finish_run must create it) and the runs promoted into its slot.
    run: FinishedRun


def close_case(
    *,
    lease_id: int,
    result_id: int,
    run_id: int,
    provider_id: int,
    status: str,
    fields: dict,
    succeeded: bool,
    skip_rest: bool,
    keeper: str = "",
    event_interval: float,
) -> Closed:
    """A finished case in one round trip (the server-side function pcr_close_case): give back
    its call slot, locking the provider's row first (a success grows the AIMD ceiling); if
    the lease was still held (the fence, as in give_back_case), write the outcome exactly once
    and add it to the run's totals, skipping the run's pending cases when `skip_rest`; if
    that was the run's last case, finish the run and promote the next runs (as finish_run);
    then promote waiting cases into the free slots, the first kept for `keeper`. In
    autocommit this is one statement and one transaction; inside the caller's, part of it."""
    # "calls_counted" is no column: how many of the case's calls the worker already added to
    # the run's calls_done while the case ran; pcr_close_case adds the rest.
    unknown = fields.keys() - OUTCOME_COLUMNS - {"calls_counted"}
    if unknown:
        raise ValueError(f"not outcome columns of a result: {sorted(unknown)}")
    (row,) = _rows(
        SQL["close_case"],
        {
            "lease": lease_id,
            "result": result_id,
            "run": run_id,
            "provider": provider_id,
            "status": status,
            "fields": json.dumps(
                {name: _storable_scalar(value) for name, value in fields.items()},
                cls=DjangoJSONEncoder,
                allow_nan=False,
            ),
            "succeeded": succeeded,
            "skip_rest": skip_rest,
            "keeper": keeper,
            "ttl": lease_ttl(),
            "event_interval": event_interval,
            "runs": RUNS,
            "per_user": RUNS_PER_USER,
        },
    )
    held, written, complete, event_due, admitted, finished, promoted = row
    if isinstance(admitted, str):  # jsonb arrives as text from Django's psycopg connection
        admitted = json.loads(admitted)
    return Closed(
        held,
        written,
        complete,
        event_due,
        [Admitted(*a) for a in admitted],
        _finished(finished, promoted),
    )


def _storable_scalar(value: object) -> object:
    """JSON has no infinities or NaN; PostgreSQL's float columns take them as these words."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def throttle_provider(provider_id: int, sent_seconds_ago: float = 0.0) -> bool:
    """A 429: halve the provider's effective concurrency (multiplicative decrease), at most
    once per window. Returns whether this 429 lowered it.

    The window is one generation of requests in flight, as TCP halves its window at most once
    per round trip: a 429 to a request sent before the last decrease says nothing the decrease
    did not already act on (eight requests in flight that all come back 429 lower the ceiling
    8 -> 4 once, not 8 -> 1), while a 429 to a request sent after it says the lower ceiling is
    still too high. `sent_seconds_ago` is how long ago the request went out, measured on the
    caller's monotonic clock; subtracted from the database's clock it gives the request's
    start on the same clock as `throttled_at`, so workers' wall clocks (which drift) are never
    compared with the database's. A fixed window (ignore 429s for a second after a decrease)
    would be simpler but wrong both ways: too short for slow models, whose old requests come
    back much later, and too long for fast ones. The row lock serialises concurrent 429s; each
    re-reads throttled_at once the previous one commits. statement_timestamp(), not now(),
    so that a caller's enclosing transaction cannot freeze the clock."""
    rows = _rows(
        SQL["throttle_provider"],
        [provider_semaphore(provider_id), max(0.0, float(sent_seconds_ago))],
    )
    return bool(rows)


def release_cases_of_run(run_id: int, provider_id: int) -> list[Admitted]:
    """Inside the caller's transaction, after it locked the provider's row: drop every case
    lease of a run (cancel) and let other runs' cases use the freed slots."""
    _delete_leases("run_id = %(run)s AND result_id IS NOT NULL", {"run": run_id})
    return admit_cases_locked(provider_id)


# --- Liveness ------------------------------------------------------------------------------


def heartbeat(holder: str, lease_ids: list[int]) -> int:
    """Extend the leases this worker process is working on; returns how many. Only those:
    a lease it holds but forgot (a case kept for a thread that then died) is left to expire,
    so the sweeper gives its case to someone else."""
    with connection.cursor() as cursor:
        cursor.execute(SQL["heartbeat"], [lease_ttl(), holder, list(lease_ids)])
        return cursor.rowcount


class LeaseFilter(NamedTuple):
    condition: str  # over testruns_lease as `l`
    params: list


EXPIRED = LeaseFilter("l.expires_at <= now()", [])


def held_by(holder: str) -> LeaseFilter:
    return LeaseFilter("l.holder = %s", [holder])


def held_by_earlier_process(host_and_pid: str, holder: str) -> LeaseFilter:
    """Leases of another start of a process with this host name and pid (a container
    restarted with the same hostname, a recycled pid): `host:pid` or `host:pid:<boot id>`."""
    pattern = host_and_pid.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_")
    return LeaseFilter(
        "(l.holder = %s OR l.holder LIKE %s) AND l.holder <> %s",
        [host_and_pid, pattern + ":%", holder],
    )


def requeue_cases(which: LeaseFilter) -> Iterator[tuple[int, list[Admitted]]]:
    """Delete the case leases `which` selects and make their cases pending again, one
    provider (one lock, one transaction) at a time, promoting waiters into the freed slots.
    Yields (how many were requeued, what was admitted) from inside each transaction, so the
    caller can act on it before that transaction commits."""
    providers = [
        row[0]
        for row in _rows(SQL["providers_holding"].format(condition=which.condition), which.params)
    ]
    for provider_id in providers:
        with transaction.atomic():
            sem_id = lock_provider(provider_id)[0]
            results = [
                row[0]
                for row in _rows(
                    SQL["leased_results"].format(condition=which.condition), [sem_id, *which.params]
                )
            ]
            if not results:
                continue
            _delete_leases("result_id = ANY(%(results)s)", {"results": results})
            _rows(SQL["results_to_pending"], [results])
            yield len(results), admit_cases_locked(provider_id)


def recount_in_use() -> list[tuple[str, int, int]]:
    """Heal `in_use` where it drifted from the lease rows (a lease deleted behind the gate's
    back, a bug). One statement finds the drifted rows (in one snapshot, the counter and the
    leases a transaction changed together always agree); each is then locked and recounted,
    so no acquire or release is in between. Returns (name, was, now) per correction."""
    corrected = []
    for (name,) in _rows(SQL["drifted"]):
        with transaction.atomic():
            _lock(name)
            corrected += _rows(SQL["recount"], [name])
    for name, was, now in corrected:
        log.warning("semaphore %s: in_use was %d but %d lease(s) exist; corrected", name, was, now)
    return corrected
