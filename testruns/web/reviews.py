"""The review queue: a person with the review_result permission sends a finished run's
results to review, works through the queue (the prompt, the output, the assertion reasons)
and confirms or overrides each verdict with a note. Thin: reviewing.queue does the work."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from testruns.models import Review
from testruns.reporting.access import get_run_for_user, runs_visible_to
from testruns.reporting.case_detail import case_detail
from testruns.reviewing import queue

QUEUE_PAGE_SIZE = 50


@require_GET
@permission_required(queue.PERMISSION, raise_exception=True)
def review_queue(request) -> HttpResponse:
    waiting = queue.pending(runs_visible_to(request.user))
    return render(
        request,
        "testruns/reviews.html",
        {"reviews": waiting[:QUEUE_PAGE_SIZE], "count": waiting.count()},
    )


@require_GET
@permission_required(queue.PERMISSION, raise_exception=True)
def next_review(request) -> HttpResponse:
    review = queue.next_pending(runs_visible_to(request.user))
    if review is None:
        messages.info(request, "Nothing left to review.")
        return redirect("review-queue")
    return redirect("review", pk=review.pk)


def _review_or_404(request, pk) -> Review:
    review = (
        Review.objects.filter(pk=pk, result__run__in=runs_visible_to(request.user))
        .select_related("result__run__card", "result__run__version", "reviewer")
        .first()
    )
    if review is None:
        raise Http404("No such review.")
    return review


@permission_required(queue.PERMISSION, raise_exception=True)
def review(request, pk) -> HttpResponse:
    """One result to review; POST decides it (confirm = the automatic verdict, or an
    override) and moves on to the next one, of the same run first."""
    item = _review_or_404(request, pk)
    result, run = item.result, item.result.run
    automatic = "passed" if result.status == "passed" else "failed"
    error = ""
    if request.method == "POST":
        choice = request.POST.get("decision", "")
        verdict = {"confirm": automatic, "passed": "passed", "failed": "failed"}.get(choice)
        note = request.POST.get("note", "")
        if verdict is None:
            error = "Confirm the verdict or override it."
        elif verdict != automatic and not note.strip():
            error = "Say why in a note: an override is read by others later."
        else:
            queue.decide(item, user=request.user, verdict=verdict, note=note)
            following = queue.next_pending(runs_visible_to(request.user), after=item)
            if following is None:
                messages.success(request, "Decided. Nothing left to review.")
                return redirect("report", pk=run.pk)
            return redirect("review", pk=following.pk)
    return render(
        request,
        "testruns/review.html",
        {
            "review": item,
            "result": result,
            "run": run,
            "detail": case_detail(run, result),
            "automatic": automatic,
            "left": queue.pending(runs_visible_to(request.user)).count(),
            "error": error,
            # What the form shows chosen: what was posted, else the decision so far.
            "chosen": request.POST.get("decision")
            or ("confirm" if item.verdict in ("", automatic) else item.verdict),
            "open": True,
        },
        status=400 if error else 200,
    )


@require_POST
@permission_required(queue.PERMISSION, raise_exception=True)
def mark_run(request, pk) -> HttpResponse:
    """Send a finished run's results to review: its failures, a sample of its passes and
    the cases with too little evidence against the baseline, as the report's form asks."""
    run = get_run_for_user(request.user, pk)
    if run is None:
        raise Http404("No such run.")
    if not run.is_finished:
        messages.error(request, "A run is reviewed once it has finished.")
        return redirect("report", pk=run.pk)
    try:
        share = min(1.0, max(0.0, float(request.POST.get("sample_percent", "10")) / 100))
    except ValueError:
        share = queue.DEFAULT_SAMPLE
    added = queue.mark_for_review(
        run,
        user=request.user,
        failures="failures" in request.POST,
        sample=share if "sample" in request.POST else 0.0,
        no_evidence="no_evidence" in request.POST,
    )
    total = sum(added.values())
    messages.success(request, f"{total} result{'s' if total != 1 else ''} sent to review.")
    return redirect("review-queue") if total else redirect("report", pk=run.pk)
