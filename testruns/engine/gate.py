"""The gate: counting semaphores held in PostgreSQL rows.

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

Every transaction here locks exactly one semaphore row, so there is no lock order to get
wrong. The row is locked first, in its own statement: under READ COMMITTED the next
statement takes a fresh snapshot, which then sees everything the previous holder committed.
`Semaphore.in_use` is kept equal to the number of its lease rows by changing both in the
same statement, so taking and giving back a slot need no COUNT. Lease times come from the
database clock (now()), never a worker's.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from django.conf import settings
from django.db import connection, transaction

log = logging.getLogger(__name__)

RUNS = "runs"
RUNS_PER_USER = "runs-per-user"
# A run slot is held until the run ends; only case leases are heartbeated and can expire.
RUN_SLOT_INTERVAL = "interval '100 years'"


def provider_semaphore(provider_id: int) -> str:
    return f"provider:{provider_id}"


def lease_ttl() -> float:
    return float(settings.LEASE_TTL_SECONDS)


def _rows(sql: str, params: dict | list | None = None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def ensure_semaphore(name: str, limit: int) -> None:
    _rows("INSERT INTO testruns_semaphore (name, \"limit\", in_use, corrections, updated_at) "
          "VALUES (%s, %s, 0, 0, now()) ON CONFLICT (name) DO NOTHING", [name, limit])


def set_limit(name: str, limit: int) -> list[int]:
    """Change a limit; raising it promotes waiters at once."""
    with transaction.atomic():
        _rows("UPDATE testruns_semaphore SET \"limit\" = %s, updated_at = now() "
              "WHERE name = %s", [limit, name])
    if name == RUNS or name == RUNS_PER_USER:
        return admit_runs()
    if name.startswith("provider:"):
        return admit_cases(int(name.split(":", 1)[1]))
    return []


def _lock(name: str) -> tuple[int, int, int, float | None]:
    """Lock the semaphore row; returns (id, limit, in_use, effective_limit). A row that is
    missing (deleted in the admin while it held no lease) comes back with its configured
    limit, so admission never stops on it."""
    select = ("SELECT id, \"limit\", in_use, effective_limit FROM testruns_semaphore "
              "WHERE name = %s FOR UPDATE")
    rows = _rows(select, [name])
    if not rows:
        _recreate(name)
        rows = _rows(select, [name])
    if not rows:
        raise LookupError(f"semaphore {name!r} does not exist")
    return rows[0]


def _recreate(name: str) -> None:
    if name == RUNS:
        ensure_semaphore(name, settings.MAX_CONCURRENT_RUNS)
    elif name == RUNS_PER_USER:
        ensure_semaphore(name, settings.MAX_RUNS_PER_USER)
    elif name.startswith("provider:"):
        _rows("INSERT INTO testruns_semaphore (name, \"limit\", in_use, corrections, updated_at) "
              "SELECT %s, max_concurrency, 0, 0, now() FROM testruns_provider WHERE id = %s "
              "ON CONFLICT (name) DO NOTHING", [name, int(name.split(":", 1)[1])])
    log.warning("semaphore %s was missing and has been created again", name)


# --- Runs ----------------------------------------------------------------------------------


def admit_runs() -> list[int]:
    """Promote the head of the run queue into free run slots; returns the promoted run ids."""
    with transaction.atomic():
        return _promote_runs(_lock(RUNS))


def _promote_runs(locked: tuple) -> list[int]:
    """With "runs" locked:

    1. In one statement: pick up to `limit - in_use` queued runs in queue order, skipping
       runs whose launcher is at the per-user limit, mark them running, insert their leases
       and add them to in_use.
    2. After commit: tell their pages and the queue watchers, and admit their first cases.
    """
    from testruns.live import events

    sem_id, limit, in_use, _ = locked
    if in_use >= limit:
        return []
    promoted = _rows(_ADMIT_RUNS_SQL, {"sem": sem_id, "free": limit - in_use,
                                       "per_user": RUNS_PER_USER})
    for run_id, provider_id in promoted:
        events.announce(run_id)
        transaction.on_commit(lambda p=provider_id: admit_cases(p))
    if promoted:
        events.publish_queue_changed()
    return [run_id for run_id, _ in promoted]


_ADMIT_RUNS_SQL = f"""
WITH user_limit AS (
    SELECT COALESCE((SELECT "limit" FROM testruns_semaphore WHERE name = %(per_user)s), 0) AS n
), running_per_user AS (
    SELECT r.launched_by_id AS user_id, count(*) AS n
    FROM testruns_lease l JOIN testruns_testrun r ON r.id = l.run_id
    WHERE l.semaphore_id = %(sem)s AND l.result_id IS NULL
    GROUP BY r.launched_by_id
), queue AS (
    SELECT r.id, r.priority, r.queued_at, r.launched_by_id,
           row_number() OVER (PARTITION BY r.launched_by_id
                              ORDER BY r.priority DESC, r.queued_at, r.id) AS nth_of_user
    FROM testruns_testrun r
    WHERE r.status = 'queued' AND NOT r.cancel_requested
), chosen AS (
    SELECT q.id FROM queue q LEFT JOIN running_per_user u ON u.user_id = q.launched_by_id
    WHERE (SELECT n FROM user_limit) = 0 OR q.launched_by_id IS NULL
       OR q.nth_of_user + COALESCE(u.n, 0) <= (SELECT n FROM user_limit)
    ORDER BY q.priority DESC, q.queued_at, q.id
    LIMIT %(free)s
), promoted AS (
    UPDATE testruns_testrun r SET status = 'running', phase = 'generating',
        started_at = statement_timestamp()
    FROM chosen WHERE r.id = chosen.id AND r.status = 'queued'
    RETURNING r.id, r.provider_id
), leased AS (
    INSERT INTO testruns_lease (semaphore_id, holder, run_id, acquired_at, expires_at)
    SELECT %(sem)s, 'run:' || id, id, now(), now() + {RUN_SLOT_INTERVAL} FROM promoted
    RETURNING run_id
), counted AS (
    UPDATE testruns_semaphore SET in_use = in_use + (SELECT count(*) FROM leased)
    WHERE id = %(sem)s
)
SELECT id, provider_id FROM promoted ORDER BY id
"""


def release_run(run_id: int) -> list[int]:
    """Inside the caller's transaction, after it locked "runs" (and any provider row before
    it, by name order): give back the run's slot and promote the next runs."""
    _rows(_DELETE_LEASES_SQL.format(where="run_id = %(run)s AND result_id IS NULL"),
          {"run": run_id})
    return _promote_runs(_lock(RUNS))


def lock_runs() -> tuple:
    return _lock(RUNS)


def lock_provider(provider_id: int) -> tuple:
    return _lock(provider_semaphore(provider_id))


_DELETE_LEASES_SQL = """
WITH gone AS (DELETE FROM testruns_lease WHERE {where} RETURNING semaphore_id)
UPDATE testruns_semaphore s SET in_use = s.in_use - g.n
FROM (SELECT semaphore_id, count(*) AS n FROM gone GROUP BY semaphore_id) g
WHERE s.id = g.semaphore_id
"""


# --- Cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Admitted:
    result_id: int
    lease_id: int


def admit_cases(provider_id: int) -> list[Admitted]:
    """Promote pending cases of running runs on this provider into its free call slots.

    1. Lock "provider:<id>" (fresh limit, in_use and AIMD ceiling).
    2. In one statement: per running run (priority desc, queued_at), take its first pending
       cases up to its own room (max_concurrent_tests minus its cases in flight), up to the
       provider's free slots; mark them running, insert their leases, add them to in_use.
    3. After commit: send one message per admitted case.
    """
    with transaction.atomic():
        admitted = _admit_cases_locked(provider_id)
    return admitted


_handover = threading.local()


@contextmanager
def handing_over_to(holder: str | None):
    """Within this block, the first case admitted is claimed for `holder` instead of being
    sent through the broker: the worker thread that freed a slot runs the next case itself,
    so a hand-over costs no broker round trip. Yields the list that receives it."""
    _handover.holder, _handover.taken, _handover.promised = holder, [], False
    try:
        yield _handover.taken
    finally:
        _handover.holder = None


def _admit_cases_locked(provider_id: int, locked: tuple | None = None) -> list[Admitted]:
    """admit_cases inside a transaction that holds (or may take) only this provider's row.
    `locked` is the row as the caller last read it under the lock, to save a round trip."""
    from testruns.engine import dispatch

    sem_id, limit, in_use, effective = locked or _lock(provider_semaphore(provider_id))
    ceiling = min(limit, int(effective)) if effective is not None else limit
    if in_use >= ceiling:
        return []
    keeper = getattr(_handover, "holder", None)
    keeper = keeper if keeper and not _handover.taken and not _handover.promised else ""
    rows = _rows(_ADMIT_CASES_SQL, {"sem": sem_id, "provider": provider_id,
                                    "free": ceiling - in_use, "ttl": lease_ttl(),
                                    "keeper": keeper})
    admitted = [Admitted(result_id, lease_id) for result_id, lease_id, _ in rows]
    to_send = [Admitted(result_id, lease_id) for result_id, lease_id, holder in rows
               if not holder]
    if keeper and len(to_send) < len(admitted):
        # Only once committed: a transaction that rolls back admitted nothing to keep.
        kept = [a for a in admitted if a not in to_send]
        _handover.promised = True
        transaction.on_commit(lambda: _handover.taken.extend(kept))
    if to_send:
        ids = [a.result_id for a in to_send]
        transaction.on_commit(lambda: dispatch.send_cases(ids))
    return admitted


_ADMIT_CASES_SQL = """
WITH runs AS (
    SELECT r.id, r.priority, r.queued_at, r.max_concurrent_tests -
           (SELECT count(*) FROM testruns_lease l
            WHERE l.run_id = r.id AND l.semaphore_id = %(sem)s) AS room
    FROM testruns_testrun r
    WHERE r.provider_id = %(provider)s AND r.status = 'running' AND NOT r.cancel_requested
), chosen AS (
    SELECT c.id FROM runs
    CROSS JOIN LATERAL (
        SELECT t.id, t.position FROM testruns_testresult t
        WHERE t.run_id = runs.id AND t.status = 'pending'
        ORDER BY t.position LIMIT GREATEST(runs.room, 0)
    ) c
    ORDER BY runs.priority DESC, runs.queued_at, runs.id, c.position
    LIMIT %(free)s
), promoted AS (
    UPDATE testruns_testresult t SET status = 'running', dispatched_at = NULL
    FROM chosen WHERE t.id = chosen.id AND t.status = 'pending'
    RETURNING t.id, t.run_id
), leased AS (
    -- The first admitted case may be kept by the thread that freed the slot (the keeper).
    INSERT INTO testruns_lease (semaphore_id, holder, run_id, result_id, acquired_at, expires_at)
    SELECT %(sem)s, CASE WHEN row_number() OVER (ORDER BY id) = 1 THEN %(keeper)s ELSE '' END,
           run_id, id, now(), now() + make_interval(secs => %(ttl)s)
    FROM promoted
    RETURNING result_id, id, holder
), counted AS (
    UPDATE testruns_semaphore SET in_use = in_use + (SELECT count(*) FROM leased)
    WHERE id = %(sem)s
)
SELECT result_id, id, holder FROM leased
"""


def claim_case(result_id: int, holder: str) -> int | None:
    """Take over an admitted case's lease for this worker; None if it is not ours to run
    (already claimed by another delivery, reclaimed after expiry, or cancelled)."""
    rows = _rows(
        "UPDATE testruns_lease SET holder = %s, expires_at = now() + make_interval(secs => %s) "
        "WHERE result_id = %s AND holder = '' AND expires_at > now() RETURNING id",
        [holder, lease_ttl(), result_id])
    return rows[0][0] if rows else None


class GivenBack(NamedTuple):
    locked: tuple  # the provider's row as it now is, for admit_next_cases
    held: bool  # whether the lease was still there: if not, the case is no longer ours


def give_back_case(provider_id: int, lease_id: int, *, succeeded: bool) -> GivenBack:
    """First step of a case's closing transaction: lock the provider's row by giving back the
    call slot (one statement). A success also grows the provider's AIMD ceiling back towards
    its limit.

    `held` is the fence: a lease that is gone was reclaimed (its holder looked dead: cut off,
    or stalled past the TTL) or cancelled, and the case may be running elsewhere by now, so
    its holder must write nothing. Reclaim and cancel delete leases under the same row lock,
    so the answer cannot change before this transaction ends."""
    grow = "" if not succeeded else (
        ", effective_limit = CASE WHEN s.effective_limit + 1.0 / s.effective_limit >= s.\"limit\" "
        "THEN NULL ELSE s.effective_limit + 1.0 / s.effective_limit END")
    *locked, released = _rows(_RELEASE_CASE_SQL.format(grow=grow), {
        "lease": lease_id, "name": provider_semaphore(provider_id)})[0]
    return GivenBack(tuple(locked), released > 0)


def admit_next_cases(provider_id: int, locked: tuple) -> list[Admitted]:
    """Last step of that transaction: promote waiting cases into the free slots."""
    return _admit_cases_locked(provider_id, locked)


def release_case(provider_id: int, lease_id: int, *, succeeded: bool) -> list[Admitted]:
    """Give back a call slot and promote the next cases, in the caller's transaction."""
    return admit_next_cases(provider_id, give_back_case(provider_id, lease_id,
                                                        succeeded=succeeded).locked)


# One round trip: delete the lease, give its slot back, and return the row as it now is
# and whether there was a lease to delete.
_RELEASE_CASE_SQL = """
WITH gone AS (DELETE FROM testruns_lease WHERE id = %(lease)s RETURNING semaphore_id)
UPDATE testruns_semaphore s SET in_use = s.in_use - (SELECT count(*) FROM gone){grow}
WHERE s.name = %(name)s
RETURNING s.id, s."limit", s.in_use, s.effective_limit, (SELECT count(*) FROM gone)
"""


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
        "UPDATE testruns_semaphore SET effective_limit = "
        "GREATEST(1, COALESCE(effective_limit, \"limit\") / 2), "
        "throttled_at = statement_timestamp() WHERE name = %s AND (throttled_at IS NULL OR "
        "throttled_at <= statement_timestamp() - make_interval(secs => %s)) RETURNING id",
        [provider_semaphore(provider_id), max(0.0, float(sent_seconds_ago))])
    return bool(rows)


def release_cases_of_run(run_id: int, provider_id: int) -> None:
    """Inside the caller's transaction, after it locked the provider's row: drop every case
    lease of a run (cancel) and let other runs' cases use the freed slots."""
    _rows(_DELETE_LEASES_SQL.format(where="run_id = %(run)s AND result_id IS NOT NULL"),
          {"run": run_id})
    _admit_cases_locked(provider_id)


# --- Liveness ------------------------------------------------------------------------------


def heartbeat(holder: str) -> int:
    """Extend every lease this worker process holds; returns how many."""
    with connection.cursor() as cursor:
        cursor.execute("UPDATE testruns_lease SET expires_at = now() + make_interval(secs => %s) "
                       "WHERE holder = %s", [lease_ttl(), holder])
        return cursor.rowcount


def reclaim_expired_cases() -> int:
    """Sweep case leases whose holder stopped heartbeating (killed worker, lost message):
    put their cases back to pending and refill the slots. Returns how many were reclaimed."""
    reclaimed = _requeue_cases("l.expires_at <= now()", [])
    if reclaimed:
        log.warning("reclaimed %d expired case lease(s)", reclaimed)
    return reclaimed


def hand_back(holder: str) -> int:
    """A worker shutting down returns the cases it still holds to the queue at once,
    instead of letting them wait for the lease TTL."""
    return _requeue_cases("l.holder = %s", [holder])


def hand_back_earlier_holders(host_and_pid: str, holder: str) -> int:
    """A worker starting with the host name and pid of a dead one (a container restarted
    with the same hostname, a recycled pid) returns that one's leases at once: they were
    never going to be finished, and nobody else would ever stop them from being renewed."""
    pattern = host_and_pid.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_")
    return _requeue_cases("(l.holder = %s OR l.holder LIKE %s) AND l.holder <> %s",
                          [host_and_pid, pattern + ":%", holder])


def recount_in_use() -> list[tuple[str, int, int]]:
    """Heal `in_use` where it drifted from the lease rows (a lease deleted behind the gate's
    back, a bug). One statement finds the drifted rows (in one snapshot, the counter and the
    leases a transaction changed together always agree); each is then locked and recounted,
    so no acquire or release is in between. Returns (name, was, now) per correction."""
    corrected = []
    for (name,) in _rows(_DRIFTED_SQL):
        with transaction.atomic():
            _lock(name)
            corrected += _rows(_RECOUNT_SQL, [name])
    for name, was, now in corrected:
        log.warning("semaphore %s: in_use was %d but %d lease(s) exist; corrected", name, was, now)
    return corrected


_DRIFTED_SQL = """
SELECT s.name FROM testruns_semaphore s
LEFT JOIN (SELECT semaphore_id, count(*) AS n FROM testruns_lease GROUP BY semaphore_id) c
       ON c.semaphore_id = s.id
WHERE s.in_use <> COALESCE(c.n, 0) ORDER BY s.name
"""

_RECOUNT_SQL = """
WITH counted AS (
    SELECT s.id, s.in_use AS was,
           (SELECT count(*) FROM testruns_lease l WHERE l.semaphore_id = s.id) AS n
    FROM testruns_semaphore s WHERE s.name = %s
)
UPDATE testruns_semaphore s SET in_use = counted.n, corrections = s.corrections + 1
FROM counted WHERE s.id = counted.id AND counted.was <> counted.n
RETURNING s.name, counted.was, counted.n
"""


def _requeue_cases(condition: str, params: list) -> int:
    """Delete the case leases matching `condition` and make their cases pending again, one
    provider (one lock) at a time, promoting waiters into the freed slots."""
    providers = [row[0] for row in _rows(
        "SELECT DISTINCT r.provider_id FROM testruns_lease l "
        f"JOIN testruns_testrun r ON r.id = l.run_id WHERE l.result_id IS NOT NULL AND {condition}",
        params)]
    requeued = 0
    for provider_id in providers:
        with transaction.atomic():
            sem_id = _lock(provider_semaphore(provider_id))[0]
            results = [row[0] for row in _rows(
                "SELECT l.result_id FROM testruns_lease l WHERE l.semaphore_id = %s "
                f"AND l.result_id IS NOT NULL AND {condition}", [sem_id, *params])]
            if not results:
                continue
            _rows(_DELETE_LEASES_SQL.format(where="result_id = ANY(%(results)s)"),
                  {"results": results})
            _rows("UPDATE testruns_testresult SET status = 'pending' "
                  "WHERE id = ANY(%s) AND status = 'running'", [results])
            requeued += len(results)
            _admit_cases_locked(provider_id)
    return requeued
