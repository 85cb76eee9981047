"""Recording a case's outcome: made storable first (text without NUL or lone surrogates,
numbers within their columns, notes saying what was changed), then written exactly once with
the run's totals, the call slot given back and the next case promoted, in one transaction;
retried on a fresh connection, written as a bare ERROR when the values are refused, and handed
to the sweeper (forsake) when the database is gone. Also: handing a claimed case back to the
queue, and finishing a run whose every case is done."""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import F

from testruns.engine import admission, gate, inflight
from testruns.engine.followups import followups
from testruns.engine.run_aggregates import store_run_aggregates
from testruns.engine.settling import settle_run
from testruns.live import publish
from testruns.models import TestResult, TestRun

log = logging.getLogger(__name__)

# Writing a result: retries on a fresh connection after a connection error (PostgreSQL
# restarting), then the same for a bare ERROR outcome. About 11 s in all, then the sweeper.
RECORD_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)
BARE_RECORD_RETRY_DELAYS = (1.0, 2.0, 4.0)

ERROR_CHARS = 2000  # an exception's text can be anything; the result keeps its start

# The widest values the result and run columns take (integer, numeric(14, 6)).
MAX_INT_COLUMN = 2**31 - 1
MAX_COST = Decimal("99999999.999999")

# What PostgreSQL refuses in text and jsonb: NUL, and surrogates (in a Python str they can only
# be lone ones, from a JSON escape such as "\ud800"; psycopg cannot encode them).
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


@dataclass
class CaseOutcome:
    """What running a case came to: its status and the fields its result is written with.
    `throttled` when its provider said 429 (the call slot is then given back as not a success)."""

    status: str
    fields: dict = field(default_factory=dict)
    throttled: bool = False
    # What the result should say about how it was stored (sanitised text, estimated tokens).
    notes: list[str] = field(default_factory=list)


def unexpected(exc: BaseException, fields: dict | None = None) -> CaseOutcome:
    """An ERROR outcome naming an exception nobody foresaw, its text cut to ERROR_CHARS."""
    message = f"unexpected error: {type(exc).__name__}: {exc}"
    return CaseOutcome(TestResult.Status.ERROR, {**(fields or {}), "error": message[:ERROR_CHARS]})


# --- Storing what the database can store ----------------------------------------------------


def storable_text(text: str) -> tuple[str, int]:
    """The text with NUL and lone surrogates replaced by U+FFFD, and how many there were."""
    return UNSTORABLE.subn("\ufffd", text)


def unstorable_note(what: str, count: int) -> str:
    plural = "s" if count > 1 else ""
    return (
        f"the {what} held {count} character{plural} the database cannot store (NUL or a "
        "lone surrogate), stored as U+FFFD"
    )


def _storable_json(value: Any) -> tuple[Any, int]:
    """A JSON value with its strings (keys too) made storable and non-finite numbers (which
    jsonb refuses) made null; returns how many things were changed."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None, 1
    if isinstance(value, list | tuple):
        pairs = [_storable_json(item) for item in value]
        return [item for item, _ in pairs], sum(n for _, n in pairs)
    if isinstance(value, dict):
        changed, clean = 0, {}
        for key, item in value.items():
            key, n = storable_text(str(key))
            clean[key], m = _storable_json(item)
            changed += n + m
        return clean, changed
    return value, 0


FIELD_NAMES = {
    "output": "output",
    "prompt": "prompt",
    "error": "error message",
    "assertion_results": "assertion results",
    "repeat_results": "repeat results",
}


def storable(outcome: CaseOutcome) -> CaseOutcome:
    """The outcome as the database will take it: text without NUL or lone surrogates, token
    counts and cost within their columns and never negative, and the notes written into the
    result (into `error` for an ERROR, as a note entry among the assertion results otherwise,
    so the report still shows the output)."""
    fields, notes = dict(outcome.fields), list(outcome.notes)
    for name, what in FIELD_NAMES.items():
        if name in fields:
            fields[name], replaced = _storable_json(fields[name])
            if replaced:
                notes.append(unstorable_note(what, replaced))
    for name in ("tokens_in", "tokens_out", "attempts", "repeat_passes"):
        if name in fields and not 0 <= fields[name] <= MAX_INT_COLUMN:
            notes.append(
                f"{name} was {fields[name]}, out of range; stored as "
                f"{min(max(fields[name], 0), MAX_INT_COLUMN)}"
            )
            fields[name] = min(max(fields[name], 0), MAX_INT_COLUMN)
    if "cost" in fields and not Decimal(0) <= fields["cost"] <= MAX_COST:
        notes.append(
            f"the cost was {fields['cost']}, out of range; stored as the nearest "
            "value the column holds"
        )
        fields["cost"] = min(max(fields["cost"], Decimal(0)), MAX_COST)
    if "score" in fields and isinstance(fields["score"], float) and math.isnan(fields["score"]):
        fields["score"] = None
    if notes:
        notes = [storable_text(note)[0] for note in dict.fromkeys(notes)]
        if outcome.status == TestResult.Status.ERROR or "assertion_results" not in fields:
            fields["error"] = "\n".join([fields.get("error", ""), *(f"Note: {n}" for n in notes)])
            fields["error"] = fields["error"].strip()
        else:
            fields["assertion_results"] = [
                *fields["assertion_results"],
                *(
                    {"type": "note", "passed": True, "score": 1.0, "reason": n, "weight": 0.0}
                    for n in notes
                ),
            ]
    return replace(outcome, fields=fields, notes=[])


# --- Recording ------------------------------------------------------------------------------


def close_case(run: TestRun, result: TestResult, lease_id: int, outcome: CaseOutcome) -> None:
    """Record the outcome and give back the slot, whatever the database says: the outcome as
    it is (retried after connection errors), else a bare ERROR, else hand the lease to the
    sweeper. Then finish the run if that was its last case. Never raises an Exception."""
    try:
        outcome = storable(outcome)
    except Exception as exc:  # a bug in the cleaning must not keep the case open either
        log.exception("the outcome could not be made storable")
        outcome = unexpected(exc)
    complete, failure = record_with_retries(run, result, lease_id, outcome, RECORD_RETRY_DELAYS)
    if complete is None:
        bare = bare_outcome(outcome, failure)
        complete, failure = record_with_retries(
            run, result, lease_id, bare, BARE_RECORD_RETRY_DELAYS
        )
        if complete is not None:
            log.warning("case %s recorded as a bare error: %s", result.pk, bare.fields["error"])
    if complete is None:
        log.error(
            "case %s: no outcome could be written (%s); its lease goes to the sweeper",
            result.pk,
            failure,
        )
        forsake(lease_id)
        return
    if complete:
        try:
            finish_run(run.pk)
        except Exception:  # the sweeper finishes runs whose every case is done
            log.exception("the run could not be finished; the sweeper will")
            fresh_connection()


def record_with_retries(
    run: TestRun, result: TestResult, lease_id: int, outcome: CaseOutcome, delays: tuple[float, ...]
) -> tuple[bool | None, str]:
    """record_case, again after each delay while the connection fails (a new connection each
    time). Returns (record_case's answer, "") or (None, why it could not be written): at
    once when the database refused the values, since the same values would be refused again."""
    failure = ""
    for delay in (0.0, *delays):
        if delay:
            time.sleep(delay)  # the database is restarting or unreachable: give it a moment
        try:
            return record_case(run, result, lease_id, outcome), ""
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}".strip()
            fresh_connection()
            if not isinstance(exc, OperationalError | InterfaceError):
                # DataError, IntegrityError, an encoding error: the values were refused.
                log.exception("case %s: the database refused the result", result.pk)
                return None, failure
            log.warning("case %s: writing the result failed (%s); trying again", result.pk, failure)
    return None, failure


def bare_outcome(outcome: CaseOutcome, failure: str) -> CaseOutcome:
    """Status and error text only: what is left to say when the full outcome was refused."""
    was = "" if outcome.status == TestResult.Status.ERROR else f" (it had {outcome.status})"
    error = f"the result could not be saved{was}: {failure}\n{outcome.fields.get('error', '')}"
    return CaseOutcome(
        TestResult.Status.ERROR, {"error": storable_text(error.strip()[:ERROR_CHARS])[0]}
    )


def fresh_connection() -> None:
    """Drop this thread's connection so the next query opens a new one. Not inside a
    transaction (a test's): closing there would break the transaction, not mend it."""
    if connection.in_atomic_block:
        return
    try:
        connection.close()
    except Exception:  # it was broken anyway
        pass


def forsake(lease_id: int) -> None:
    """Give the case up to the sweeper: its lease loses its holder (this process's heartbeat
    no longer renews it) and expires now, so the next sweep puts the case back in the queue.
    With the database away, the lease is remembered and handed over once it answers
    (inflight.release_forsaken, from the sweep thread)."""
    try:
        fresh_connection()
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE testruns_lease SET holder = '', expires_at = now() "
                "WHERE id = %s AND result_id IS NOT NULL",
                [lease_id],
            )
    except Exception:
        log.warning(
            "lease %s cannot be handed back yet; trying again on the next sweep",
            lease_id,
            exc_info=True,
        )
        inflight.forsake_later(lease_id)


def hand_back_case(result_id: int, lease_id: int) -> None:
    """Put a claimed case back in the queue at once (pending, slot given back, waiters
    promoted), as admission.hand_back does for a stopping process; if the database is away, to
    the sweeper. Never raises an Exception."""
    try:
        provider_id = (
            TestRun.objects.filter(results=result_id).values_list("provider_id", flat=True).first()
        )
        with transaction.atomic():
            if provider_id is not None:
                given = gate.give_back_case(provider_id, lease_id, succeeded=False)
                if given.held:  # else it was reclaimed and may be running elsewhere now
                    TestResult.objects.filter(
                        pk=result_id, status=TestResult.Status.RUNNING
                    ).update(status=TestResult.Status.PENDING)
                admission.admit_next_cases(provider_id, given.locked)
    except Exception:
        log.exception("case %s could not be handed back; its lease goes to the sweeper", result_id)
        forsake(lease_id)


STOPPING = (TestResult.Status.FAILED, TestResult.Status.ERROR)


def record_case(run: TestRun, result: TestResult, lease_id: int, outcome: CaseOutcome) -> bool:
    """Write the outcome exactly once, update the run's totals, give back the call slot and
    promote the next case, in one round trip (gate.close_case), which also finishes the run
    after its last case. Telling the pages (at most once per progress interval, and at the
    end) and storing a finished run's aggregates are follow-ups. Returns True when the run has
    no case left but could not be finished in that call."""
    closed = admission.close_case(
        lease_id=lease_id,
        result_id=result.pk,
        run_id=run.pk,
        provider_id=run.provider_id,
        status=outcome.status,
        fields=outcome.fields,
        succeeded=outcome.status != TestResult.Status.ERROR and not outcome.throttled,
        # An error stops the run as a failure does: either way the case did not pass.
        skip_rest=run.stop_on_failure and outcome.status in STOPPING,
        event_interval=publish.PROGRESS_INTERVAL_MS / 1000,
    )
    if not closed.held:
        log.warning(
            "the case's lease was taken back before its result was recorded (it was "
            "reclaimed or cancelled, and may have run elsewhere); outcome discarded"
        )
        keep_spent(run, result, outcome)
    if closed.run.status:
        log.info("run finished: %s", closed.run.status, extra={"run_id": run.pk})
        promoted = closed.run.promoted
        followups.later(lambda: announce_finished(run, promoted))
        followups.later(lambda: store_run_aggregates(run.pk))
        followups.later(lambda: settle_run(run.pk))
    elif closed.event_due:
        followups.later(lambda: announce_progress(run.pk))
    # Complete but not finished in that call: the run was cancelled meanwhile, or its "runs"
    # row was gone; finish_run looks again (and creates the row).
    return closed.complete and not closed.run.status


# What a cancelled case keeps of the calls it finished (the rest of its outcome is dropped:
# a verdict on a case nobody let finish would be misleading).
SPENT_FIELDS = (
    "prompt",
    "repeat_results",
    "repeat_passes",
    "tokens_in",
    "tokens_out",
    "cost",
    "attempts",
    "retries",
    "cached",
)


def keep_spent(run: TestRun, result: TestResult, spent: CaseOutcome | None) -> bool:
    """A case whose run was cancelled while it ran: the model calls it finished were paid
    for, so its (skipped) result keeps their repeats, tokens and cost, and the run's totals
    count them. Only for a cancelled run (a case reclaimed from a stalled worker runs again
    and is counted there) and only once per result (two executions of one case may both get
    here). Returns whether anything was kept; never raises an Exception."""
    answered = spent and any(
        spent.fields.get(k) for k in ("repeat_results", "tokens_in", "tokens_out")
    )
    if not answered:
        return False
    try:
        fields = {k: v for k, v in storable(spent).fields.items() if k in SPENT_FIELDS}
        fields["error"] = "the run was cancelled while this case ran; the answers it had are kept"
        with transaction.atomic():
            kept = TestResult.objects.filter(
                pk=result.pk,
                status=TestResult.Status.SKIPPED,
                attempts=0,
                run__status=TestRun.Status.CANCELLED,
            ).update(**fields)
            if kept:
                TestRun.objects.filter(pk=run.pk).update(
                    tokens_in=F("tokens_in") + fields.get("tokens_in", 0),
                    tokens_out=F("tokens_out") + fields.get("tokens_out", 0),
                    cost=F("cost") + fields.get("cost", 0),
                )
        return bool(kept)
    except Exception:
        log.warning("what case %s had spent could not be kept", result.pk, exc_info=True)
        fresh_connection()
        return False


def announce_finished(run: TestRun, promoted: list[gate.PromotedRun]) -> None:
    """The run and the runs promoted into its slot are committed; telling their pages must
    not make the case look unwritten. What fails here is logged: pages that miss it catch up
    from their next snapshot, and the sweeper admits cases of promoted runs."""
    try:
        admission.announce_finished(run.pk, run.provider_id, promoted)
    except Exception:
        log.warning("the end of run %s could not be announced", run.pk, exc_info=True)
        fresh_connection()


def announce_progress(run_id: int) -> None:
    """Cosmetic once the outcome is written: a progress event that cannot be taken is left
    to the next one, or to the sweeper's flush of unannounced results."""
    try:
        with transaction.atomic():
            publish.announce(run_id, kind="progress", force=False)
    except Exception:
        log.warning("progress of run %s could not be announced", run_id, exc_info=True)
        fresh_connection()


def count_call(run_id: int) -> None:
    """A follow-up of each repeat but a case's last (their case is still running): the call
    counts in the run's progress at once, and the pages hear of it within a progress
    interval. Cosmetic: a failure is logged and the call counts when its case closes."""
    try:
        with transaction.atomic():
            TestRun.objects.filter(pk=run_id).update(calls_done=F("calls_done") + 1)
            publish.announce(run_id, kind="progress", force=False)
    except Exception:
        log.warning("a call of run %s could not be counted yet", run_id, exc_info=True)
        fresh_connection()


def finish_run(run_id: int) -> bool:
    """Close a running run whose cases are all done and hand its slot to the next run (the
    sweeper's repair, and the slower path when the "runs" row had to be created again)."""
    with transaction.atomic():
        status = admission.finish_run(run_id)
    if status is None:
        return False
    log.info("run finished: %s", status, extra={"run_id": run_id})
    store_run_aggregates(run_id)  # after the commit: the run slot is not held for the scan
    settle_run(run_id)
    return True
