"""Settling a finished run: what its end leaves to do once, whichever process sees it first.
In one transaction it claims the run (`settled_at` set by a conditional update), adds it to
the /metrics counters (engine.counters) and creates one pending notification delivery per
enabled rule of its card or of the schedule that launched it; after commit the deliveries'
messages go to the broker (dispatch), where notify.delivering decides what each says and
whether the run met the rule's events at all.

Called as a follow-up when a case finishes its run (never on the case's path, never failing
it), and by every sweep for runs that ended another way (cancelled, finished by the sweeper,
a worker gone between its commit and its follow-ups). A claimed run is never settled again,
so counters count it once and its notices are sent once, however many processes race.
"""

from __future__ import annotations

import logging

from django.db import connection, transaction

from testruns.engine import counters, dispatch
from testruns.models import TestRun

log = logging.getLogger(__name__)

# How many finished runs one sweep settles (each costs an aggregate over its results).
SETTLE_BATCH = 50

_CLAIM_ONE = """
UPDATE testruns_testrun SET settled_at = now()
WHERE id = %(run)s AND settled_at IS NULL AND status = ANY(%(finished)s)
RETURNING id
"""

_CLAIM_BATCH = """
UPDATE testruns_testrun r SET settled_at = now()
FROM (SELECT id FROM testruns_testrun WHERE settled_at IS NULL AND status = ANY(%(finished)s)
      ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) AS claimed
WHERE r.id = claimed.id
RETURNING r.id
"""

# A rule applies to a run of its card, or to a run its schedule launched.
_CREATE_DELIVERIES = """
INSERT INTO testruns_notificationdelivery
    (rule_id, run_id, channel, status, events, payload, summary, attempts, last_error, created_at)
SELECT n.id, r.id, n.channel, 'pending', '[]'::jsonb, '{}'::jsonb, '', 0, '', now()
FROM testruns_testrun r
LEFT JOIN testruns_schedulelaunch l ON l.id = r.schedule_launch_id
JOIN testruns_notificationrule n
  ON n.enabled AND (n.card_id = r.card_id OR n.schedule_id = l.schedule_id)
WHERE r.id = ANY(%(runs)s)
ORDER BY r.id, n.id
ON CONFLICT (rule_id, run_id) DO NOTHING
RETURNING id
"""


def settle_run(run_id: int) -> bool:
    """The follow-up of a run's end. Returns whether this call settled it. Never raises an
    Exception: what fails here, the next sweep settles."""
    try:
        return bool(_settle(_CLAIM_ONE, {"run": run_id}))
    except Exception:
        log.warning("run %s could not be settled yet; a sweep will", run_id, exc_info=True)
        return False


def settle_finished_runs(limit: int = SETTLE_BATCH) -> int:
    """A sweep step: settle finished runs nobody settled yet. Returns how many."""
    return len(_settle(_CLAIM_BATCH, {"limit": limit}))


def _settle(claim: str, params: dict) -> list[int]:
    """1. Claim the runs (rows another transaction holds are skipped or, for one run, waited
       for and then found settled).
    2. Count them into the counters.
    3. Create their deliveries, and send them after commit."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(claim, params | {"finished": list(TestRun.FINISHED)})
            run_ids = [row[0] for row in cursor.fetchall()]
            if not run_ids:
                return []
            counters.count_finished_runs(run_ids)
            cursor.execute(_CREATE_DELIVERIES, {"runs": run_ids})
            deliveries = [row[0] for row in cursor.fetchall()]
        if deliveries:
            transaction.on_commit(lambda: dispatch.send_deliveries(deliveries))
    return run_ids
