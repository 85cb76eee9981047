"""Sending admitted cases to the workers through the broker.

A message is sent only after the admission committed. If the broker is unreachable the
case stays admitted with no `dispatched_at`, and the sweeper sends it again later: nothing
launched while Redis is down is lost.
"""

from __future__ import annotations

import logging

import dramatiq
from django.db.models.expressions import RawSQL
from django.db.models.functions import Now

from testruns.models import TestResult

log = logging.getLogger(__name__)


# The actor is looked up by name on the broker (testruns.apps registers it in every
# process): importing testruns.actors here would make the flow circle back from the gate to
# the execution it leads to.
CASE_ACTOR = "execute_case"


def send_cases(result_ids: list[int]) -> int:
    execute_case = dramatiq.get_broker().get_actor(CASE_ACTOR)
    sent = []
    for result_id in result_ids:
        try:
            execute_case.send(result_id)
        except Exception:
            log.warning(
                "broker unreachable; %d case(s) will be re-sent by the sweeper",
                len(result_ids) - len(sent),
                exc_info=True,
            )
            break
        sent.append(result_id)
    if sent:
        TestResult.objects.filter(pk__in=sent).update(dispatched_at=Now())
    return len(sent)


def resend_undispatched(min_age_seconds: float = 2.0) -> int:
    """Send again the admitted cases whose message never went out (by the database clock)."""
    cutoff = RawSQL("now() - make_interval(secs => %s)", [min_age_seconds])
    stuck = list(
        TestResult.objects.filter(
            status=TestResult.Status.RUNNING,
            dispatched_at=None,
            leases__holder="",
            leases__acquired_at__lt=cutoff,
        )
        .exclude(run__cancel_requested=True)
        .values_list("pk", flat=True)[:1000]
    )
    return send_cases(stuck) if stuck else 0
