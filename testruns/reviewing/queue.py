"""Marking results for review, the queue, and decisions. A decision never touches the
result's own status: the Review row holds the person's verdict and note beside it."""

from __future__ import annotations

import hashlib
import math

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from testruns.models import Review, TestResult, TestRun
from testruns.reporting.baselines import baseline_for
from testruns.reporting.verdicts import run_verdict

PERMISSION = "testruns.review_result"
# Of a run's passes, this share is sampled for review (at least one when there are any).
DEFAULT_SAMPLE = 0.1


def sample_of(result_ids: list[int], share: float) -> list[int]:
    """`share` of the results, at least one: a stable pick (by a hash of each id), so marking
    a run again picks the same ones, and not the first cases every time."""
    if not result_ids or share <= 0:
        return []
    count = max(1, math.ceil(share * len(result_ids)))
    key = lambda pk: hashlib.sha256(f"review-sample:{pk}".encode()).digest()  # noqa: E731
    return sorted(result_ids, key=key)[:count]


def mark_for_review(
    run: TestRun,
    *,
    user: AbstractBaseUser,
    failures: bool = True,
    sample: float = DEFAULT_SAMPLE,
    no_evidence: bool = True,
) -> dict[str, int]:
    """Put results of a finished run in the review queue: its failed and errored cases, a
    sample of its passes (`sample` of them, at least one, the same ones each time), and the
    cases whose change from the baseline had too little evidence to call. A result already
    in the queue stays as it is. Returns how many were added, by reason."""
    results = run.results.all()
    wanted: dict[int, str] = {}
    if no_evidence and (baseline := baseline_for(user, run)) is not None:
        verdict = run_verdict(baseline, run)
        positions = [case.position for case in verdict.no_evidence]
        for pk in results.filter(position__in=positions).values_list("pk", flat=True):
            wanted[pk] = Review.Reason.NO_EVIDENCE
    if failures:
        failing = results.filter(status__in=[TestResult.Status.FAILED, TestResult.Status.ERROR])
        for pk in failing.values_list("pk", flat=True):
            wanted.setdefault(pk, Review.Reason.FAILURE)
    passes = list(results.filter(status=TestResult.Status.PASSED).values_list("pk", flat=True))
    for pk in sample_of(passes, sample):
        wanted.setdefault(pk, Review.Reason.SAMPLE)
    already = set(Review.objects.filter(result__run=run).values_list("result_id", flat=True))
    wanted = {pk: reason for pk, reason in wanted.items() if pk not in already}
    Review.objects.bulk_create(
        [Review(result_id=pk, reason=reason, requested_by=user) for pk, reason in wanted.items()],
        ignore_conflicts=True,  # marked meanwhile by someone else: theirs stands
    )
    counts: dict[str, int] = {}
    for reason in wanted.values():
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def pending(visible_runs: QuerySet[TestRun]) -> QuerySet[Review]:
    """Reviews waiting for a decision on runs the reviewer may see, oldest request first."""
    return (
        Review.objects.filter(verdict="", result__run__in=visible_runs)
        .select_related("result__run__card", "result__run__provider", "result__run__version")
        .order_by("requested_at", "id")
    )


def next_pending(visible_runs: QuerySet[TestRun], *, after: Review | None = None) -> Review | None:
    """The next review to do: of the same run as `after` first (a reviewer works through a
    run), then the oldest request."""
    queue = pending(visible_runs)
    if after is not None:
        same_run = queue.filter(result__run=after.result.run_id).exclude(pk=after.pk).first()
        if same_run is not None:
            return same_run
    return queue.exclude(pk=after.pk if after else None).first()


def decide(review: Review, *, user: AbstractBaseUser, verdict: str, note: str = "") -> Review:
    """Record the person's verdict on a result (passed or failed) with a note. Deciding again
    replaces the earlier decision; the result's automatic status is never touched."""
    if verdict not in Review.Verdict.values:
        raise ValueError(f"a review's verdict is passed or failed, not {verdict!r}")
    with transaction.atomic():
        Review.objects.filter(pk=review.pk).update(
            verdict=verdict, note=note.strip(), reviewer=user, reviewed_at=timezone.now()
        )
    review.refresh_from_db()
    return review
