"""Sending admitted cases, and notification deliveries, to the workers through the broker.

A message is sent only after the admission committed. If the broker is unreachable the
case stays admitted with no `dispatched_at`, and the sweeper sends it again later: nothing
launched while Redis is down is lost.
"""

from __future__ import annotations

import logging

import dramatiq
from django.db import connection
from django.db.models import Model, Q
from django.db.models.expressions import RawSQL
from django.db.models.functions import Now

from testruns.models import NotificationDelivery, TestResult

log = logging.getLogger(__name__)


# The actor is looked up by name on the broker (testruns.apps registers it in every
# process): importing testruns.actors here would make the flow circle back from the gate to
# the execution it leads to.
CASE_ACTOR = "execute_case"


def _send_each(actor_name: str, model: type[Model], ids: list[int], what: str, **options) -> int:
    """One message per id to the actor, by name; the rows sent are marked `dispatched_at`.
    The first broker failure stops the sending: the rest keep no `dispatched_at`, and the
    sweeper sends them again once the broker answers."""
    actor = dramatiq.get_broker().get_actor(actor_name)
    sent = []
    for pk in ids:
        try:
            actor.send_with_options(args=(pk,), **options)
        except Exception:
            log.warning(
                "broker unreachable; %d %s(s) will be re-sent by the sweeper",
                len(ids) - len(sent),
                what,
                exc_info=True,
            )
            break
        sent.append(pk)
    if sent:
        model.objects.filter(pk__in=sent).update(dispatched_at=Now())
    return len(sent)


def send_cases(result_ids: list[int]) -> int:
    return _send_each(CASE_ACTOR, TestResult, result_ids, "case")


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


# --- Notifications --------------------------------------------------------------------------

# Looked up by name for the same reason as CASE_ACTOR (notify.delivering sits above the engine).
DELIVERY_ACTOR = "deliver_notification"
# A delivery whose message never went out (or whose sender died mid-attempt) is sent again by
# the sweeper after this long.
REDELIVER_AFTER_SECONDS = 2.0


def send_deliveries(delivery_ids: list[int], *, delay_ms: int | None = None) -> int:
    """Send notification deliveries to the workers (after the commit that created or retried
    them); `delay_ms` holds a retry back in the broker until its backoff has passed."""
    options = {"delay": delay_ms} if delay_ms else {}
    return _send_each(DELIVERY_ACTOR, NotificationDelivery, delivery_ids, "notification", **options)


# An attempt whose claim ran out (its worker died mid-send) becomes a retry due now.
_RELEASE_STALE_CLAIMS = """
UPDATE testruns_notificationdelivery
SET status = 'retrying', dispatched_at = NULL, next_attempt_at = now(), claimed_until = NULL
WHERE status = 'sending' AND claimed_until < now()
"""


def resend_undelivered() -> int:
    """A sweep step: send again the deliveries whose message never reached the broker (or
    whose attempt was cut off), once they are due by the database clock."""
    with connection.cursor() as cursor:
        cursor.execute(_RELEASE_STALE_CLAIMS)
    cutoff = RawSQL("now() - make_interval(secs => %s)", [REDELIVER_AFTER_SECONDS])
    stuck = list(
        NotificationDelivery.objects.filter(
            status__in=[NotificationDelivery.Status.PENDING, NotificationDelivery.Status.RETRYING],
            dispatched_at=None,
        )
        .filter(Q(next_attempt_at__lt=cutoff) | Q(next_attempt_at=None, created_at__lt=cutoff))
        .values_list("pk", flat=True)[:1000]
    )
    return send_deliveries(stuck) if stuck else 0
