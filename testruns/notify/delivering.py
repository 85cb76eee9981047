"""Delivering one notification: claimed by one worker at a time, composed once, sent, and
every attempt written to the delivery log; a failed attempt is retried with exponential
backoff by sending the message again through Dramatiq with a delay, up to
NOTIFY_MAX_ATTEMPTS. No transaction is held while the receiver is called.

A message that arrives twice (a redelivery, the sweeper's re-send) finds the delivery claimed
or done and returns: each attempt is made by one worker, and a sent notice is not sent again
(receivers that must be sure dedupe on the X-PCR-Delivery header: a worker that dies after
the receiver answered but before it wrote so makes the sweeper retry).
"""

from __future__ import annotations

import logging
import random
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models.functions import Now
from django.utils import timezone

from testruns.engine import counters, dispatch
from testruns.models import DeliveryAttempt, NotificationDelivery
from testruns.notify import channels, messages

log = logging.getLogger(__name__)

Status = NotificationDelivery.Status
# Beyond the send's own timeout: how long a claim lasts before the sweeper frees it.
CLAIM_MARGIN_SECONDS = 30
ERROR_CHARS = 2000

_CLAIM = """
UPDATE testruns_notificationdelivery
SET status = 'sending', attempts = attempts + 1,
    claimed_until = now() + make_interval(secs => %(claim)s)
WHERE id = %(delivery)s AND status IN ('pending', 'retrying')
RETURNING attempts
"""


def backoff_seconds(attempt: int) -> float:
    """The wait after failed attempt number `attempt` (1, 2, ...): the base, doubling, capped,
    with up to 10% jitter so that retries of one outage do not arrive together."""
    base = settings.NOTIFY_RETRY_BASE_SECONDS * 2 ** (attempt - 1)
    wait = min(base, settings.NOTIFY_RETRY_MAX_SECONDS)
    return wait * (1 + random.uniform(0, 0.1))


def claim(delivery_id: int) -> int | None:
    """The attempt's number, or None when another worker has it or it is done."""
    timeout = settings.NOTIFY_TIMEOUT_SECONDS + CLAIM_MARGIN_SECONDS
    with connection.cursor() as cursor:
        cursor.execute(_CLAIM, {"claim": timeout, "delivery": delivery_id})
        row = cursor.fetchone()
    return row[0] if row else None


def deliver(delivery_id: int) -> str | None:
    """Make the next attempt at a delivery. Returns its status afterwards (None: nothing to do).

    1. Claim it (pending or retrying); else another worker has it, or it is done.
    2. Compose its notice the first time (kept for every later attempt); a run that met none
       of the rule's events is skipped, and nothing is sent.
    3. Send it, with no transaction open.
    4. Log the attempt; then it is sent, or retried after a backoff, or failed after the last
       attempt; counted in /metrics either way.
    """
    attempt = claim(delivery_id)
    if attempt is None:
        return None
    delivery = (
        NotificationDelivery.objects.select_related(
            "rule",
            "run__card",
            "run__provider",
            "run__version",
            "run__schedule_launch__schedule",
        )
        .filter(pk=delivery_id)
        .first()
    )
    if delivery is None:  # its run (or rule) was deleted meanwhile
        return None
    if not delivery.payload:
        notice = messages.compose(delivery)
        delivery.payload, delivery.events = notice, notice["events"]
        delivery.summary = notice["summary"]
        delivery.save(update_fields=["payload", "events", "summary"])
    if not delivery.events:
        return _finish(delivery, Status.SKIPPED)
    started = timezone.now()
    try:
        sent = channels.send(delivery.rule, delivery.payload)
    except Exception as exc:  # a bug must cost one attempt, not the delivery
        log.exception("notification %s: sending failed", delivery_id)
        sent = channels.Sent(False, error=f"unexpected error: {type(exc).__name__}: {exc}")
    return _record(delivery, attempt, started, sent)


def _record(
    delivery: NotificationDelivery, attempt: int, started: datetime, sent: channels.Sent
) -> str:
    channel = delivery.channel
    with transaction.atomic():
        DeliveryAttempt.objects.create(
            delivery=delivery,
            number=attempt,
            started_at=started,
            finished_at=timezone.now(),
            ok=sent.ok,
            status_code=sent.status_code,
            error=sent.error[:ERROR_CHARS],
        )
        if sent.ok:
            counters.add("notifications_sent", {"channel": channel})
            log.info("notification %s sent (attempt %d)", delivery.pk, attempt)
            return _finish(delivery, Status.SENT)
        counters.add("notification_attempts_failed", {"channel": channel})
        delivery.last_error = sent.error[:ERROR_CHARS]
        if attempt >= settings.NOTIFY_MAX_ATTEMPTS:
            counters.add("notifications_failed", {"channel": channel})
            log.warning(
                "notification %s failed after %d attempts: %s", delivery.pk, attempt, sent.error
            )
            return _finish(delivery, Status.FAILED)
        wait = backoff_seconds(attempt)
        NotificationDelivery.objects.filter(pk=delivery.pk).update(
            status=Status.RETRYING,
            last_error=delivery.last_error,
            claimed_until=None,
            dispatched_at=None,
            next_attempt_at=Now() + timedelta(seconds=wait),
        )
        transaction.on_commit(
            lambda: dispatch.send_deliveries([delivery.pk], delay_ms=int(wait * 1000))
        )
    log.info(
        "notification %s: attempt %d failed (%s); retrying in %.1fs",
        delivery.pk,
        attempt,
        sent.error,
        wait,
    )
    return Status.RETRYING


def _finish(delivery: NotificationDelivery, status: str) -> str:
    NotificationDelivery.objects.filter(pk=delivery.pk).update(
        status=status, last_error=delivery.last_error, claimed_until=None, finished_at=Now()
    )
    return status
