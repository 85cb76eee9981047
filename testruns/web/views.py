"""Pages. Thin: they translate the request and call services and selectors. Every run is
looked up through `get_run_for_user`, so a run the user may not see is a 404."""

from __future__ import annotations

from typing import NamedTuple

from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.core.paginator import Paginator
from django.http import (
    Http404,
    HttpResponse,
    HttpResponseForbidden,
    JsonResponse,
    StreamingHttpResponse,
)
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from testruns.catalog import cards
from testruns.engine import launching, scheduling
from testruns.live import snapshots
from testruns.models import PromptCard, TestResult, TestRun
from testruns.reporting import run_csv
from testruns.reporting.access import can_cancel, get_run_for_user, runs_visible_to
from testruns.reporting.baselines import baseline_for, changes_since
from testruns.reporting.case_detail import case_detail
from testruns.reporting.formats import junit_xml, run_json_text
from testruns.reporting.history import card_trends, filter_runs, run_statistics
from testruns.reporting.statistics import reviewed_pass_rate
from testruns.reporting.verdicts import CaseVerdict, run_verdict
from testruns.reviewing import queue
from testruns.web.downloads import download
from testruns.web.forms import (
    HistoryFilterForm,
    LaunchForm,
    card_to_launch,
    last_launch,
    remember_launch,
)

HISTORY_PAGE_SIZE = 25
REPORT_PAGE_SIZE = 50
# What the report's case table and its case detail do not show of a result, left unread
# (the assertions as written; their outcomes are what the page shows).
REPORT_UNUSED_FIELDS = ("assertions",)
TREND_CHARTS = 6


def _run_or_404(request, pk) -> TestRun:
    run = get_run_for_user(request.user, pk)
    if run is None:
        raise Http404("No such run.")
    return run


def _page_number(request) -> int:
    try:
        return max(1, int(request.GET.get("page", 1)))
    except ValueError:
        return 1


# --- Dashboard -----------------------------------------------------------------------------


@require_GET
def dashboard(request) -> HttpResponse:
    state = snapshots.dashboard_state(runs_visible_to(request.user))
    return render(request, "testruns/dashboard.html", {"state": state})


@require_GET
def dashboard_json(request) -> HttpResponse:
    return JsonResponse(snapshots.dashboard_state(runs_visible_to(request.user)))


# --- Launch --------------------------------------------------------------------------------


@permission_required("testruns.launch_testrun", raise_exception=True)
def launch(request) -> HttpResponse:
    """GET ?card=<id> shows that card's versions and cases (without it, the card launched
    last, else the first); POST launches one run per chosen provider (several form a
    comparison group) and leads to the run or the comparison. The providers and settings of
    the user's last launch are offered again."""
    remembered = last_launch(request.session)
    card = card_to_launch(
        request.POST.get("card") or request.GET.get("card"),
        remembered,
        fall_back=request.method == "GET",
    )
    form = LaunchForm(request.POST or None, card=card, remembered=remembered)
    if request.method == "POST" and form.is_valid():
        try:
            runs = launching.launch_runs(user=request.user, **form.launch_arguments())
        except launching.LaunchError as exc:
            form.add_error(None, str(exc))
        else:
            remember_launch(request.session, form)
            # Said once, on the page the launch leads to, and transient there: that page shows
            # the run's own state (queued, running, done), which soon outdates any banner.
            if len(runs) == 1:
                messages.success(request, f"Run #{runs[0].pk} launched.", extra_tags="transient")
                return redirect(runs[0])
            messages.success(
                request, f"{len(runs)} runs launched for comparison.", extra_tags="transient"
            )
            return redirect("comparison", group=runs[0].comparison_group)
    return render(
        request,
        "testruns/launch.html",
        {
            "form": form,
            "card": card,
            "cards": PromptCard.objects.order_by("name"),
            "remembered": bool(remembered),
        },
    )


# --- Live run page -------------------------------------------------------------------------


@require_GET
def run_detail(request, pk) -> HttpResponse:
    run = _run_or_404(request, pk)
    return render(
        request,
        "testruns/run_detail.html",
        {
            "run": run,
            "can_cancel": can_cancel(request.user, run),
            "live_rows": snapshots.LIVE_ROWS,
        },
    )


@require_GET
def run_status(request, pk) -> HttpResponse:
    """The page's fallback when it has no WebSocket: the same snapshot, polled."""
    return JsonResponse(snapshots.run_snapshot(_run_or_404(request, pk)))


@require_GET
def run_results(request, pk) -> HttpResponse:
    """Finished results by position, a page at a time, beyond what the live page keeps."""
    run = _run_or_404(request, pk)
    return JsonResponse(
        snapshots.result_page(run, page=_page_number(request), status=request.GET.get("status"))
    )


@require_GET
def result_detail(request, pk, position) -> HttpResponse:
    """One case's detail as an HTML fragment (the report's, escaped like it), for the live
    page to show when a row is expanded."""
    run = _run_or_404(request, pk)
    result = run.results.filter(position=position).defer(*REPORT_UNUSED_FIELDS).first()
    if result is None:
        raise Http404("No such case in this run.")
    return render(
        request,
        "testruns/_case_detail.html",
        {"run": run, "result": result, "detail": case_detail(run, result), "open": True},
    )


@require_POST
def run_cancel(request, pk) -> HttpResponse:
    run = _run_or_404(request, pk)
    if not request.user.has_perm("testruns.cancel_testrun"):
        return HttpResponseForbidden("You may not cancel runs.")
    cancelled = launching.cancel_run(run, user=request.user)
    if request.headers.get("Accept") == "application/json":
        return JsonResponse({"cancelled": cancelled})
    if cancelled:
        messages.success(request, f"Run #{run.pk} cancelled.")
    else:
        messages.info(request, f"Run #{run.pk} had already finished.")
    return redirect(run)


# --- History -------------------------------------------------------------------------------


@require_GET
def history(request) -> HttpResponse:
    form = HistoryFilterForm(request.GET or None, user=request.user)
    filters = form.cleaned_data if form.is_valid() else {}
    runs = filter_runs(
        runs_visible_to(request.user), **{key: value for key, value in filters.items() if value}
    )
    page = Paginator(runs.order_by("-queued_at", "-pk"), HISTORY_PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    card_ids = list(dict.fromkeys(run.card_id for run in page))[:TREND_CHARTS]
    if filters.get("card"):
        card_ids = [filters["card"].pk]
    trend_runs = filter_runs(
        runs_visible_to(request.user),
        provider=filters.get("provider"),
        launcher=filters.get("launcher"),
    )
    trends = card_trends(trend_runs, card_ids)
    names = dict(PromptCard.objects.filter(pk__in=card_ids).values_list("pk", "name"))
    charts = [
        {"card": names[card_id], "chart": trend_chart(points)}
        for card_id, points in trends.items()
        if points
    ]
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "testruns/history.html",
        {
            "form": form,
            "card": filters.get("card"),
            "next_schedule": filters.get("card") and scheduling.next_scheduled_for(filters["card"]),
            "page": page,
            "charts": charts,
            "query": query.urlencode(),
        },
    )


# The x axis labels at most this many runs' finish times (first and last always).
X_TICKS = 4


def trend_chart(points: list[dict], width: int = 560, height: int = 170) -> dict:
    """SVG geometry for pass rate (left axis, 0-100 %) and p95 latency (right axis) per run,
    oldest to newest, with the runs' finish times along the x axis and a hover band per run
    whose tooltip says everything about it; drawn by the template from data the page has."""
    pad_x, pad_y, pad_bottom = 40, 12, 32
    inner_w, inner_h = width - 2 * pad_x, height - pad_y - pad_bottom
    top_latency = max((p["p95"] or 0 for p in points), default=0) or 1
    step = inner_w / max(1, len(points) - 1)
    dots = []
    for i, point in enumerate(points):
        x = pad_x + (i * step if len(points) > 1 else inner_w / 2)
        rate_y = (
            pad_y + inner_h * (1 - point["pass_rate"]) if point["pass_rate"] is not None else None
        )
        latency_y = (
            pad_y + inner_h * (1 - point["p95"] / top_latency) if point["p95"] is not None else None
        )
        dots.append(
            {
                **point,
                "x": round(x, 1),
                "rate_y": rate_y and round(rate_y, 1),
                "latency_y": latency_y and round(latency_y, 1),
            }
        )
    every = max(1, round((len(dots) - 1) / (X_TICKS - 1))) if len(dots) > 1 else 1
    ticks = [d for i, d in enumerate(dots) if i % every == 0 or i == len(dots) - 1]
    band = step if len(points) > 1 else inner_w
    for dot in dots:
        dot["band_x"] = round(dot["x"] - band / 2, 1)
    return {
        "width": width,
        "height": height,
        "pad_x": pad_x,
        "pad_y": pad_y,
        "right": width - pad_x,
        "bottom": height - pad_bottom,
        "label_y": height - pad_bottom + 16,
        "inner_h": inner_h,
        "band": round(band, 1),
        "ticks": ticks,
        "top_latency": round(top_latency),
        "rate_line": " ".join(f"{d['x']},{d['rate_y']}" for d in dots if d["rate_y"] is not None),
        "latency_line": " ".join(
            f"{d['x']},{d['latency_y']}" for d in dots if d["latency_y"] is not None
        ),
        "dots": dots,
    }


# --- Reports -------------------------------------------------------------------------------


class ReportRow(NamedTuple):
    result: TestResult
    mark: str | None  # "regression" or "fix": the verdict flipped since the baseline
    detail: dict  # reporting.case_detail
    verdict: CaseVerdict | None  # the change against the baseline, knowing noise


@require_GET
def report(request, pk) -> HttpResponse:
    run = _run_or_404(request, pk)
    baseline = None
    if request.GET.get("baseline"):
        baseline = get_run_for_user(request.user, request.GET["baseline"])
    baseline = baseline or baseline_for(request.user, run)
    status = request.GET.get("status", "")
    results = run.results.order_by("position").select_related("review").defer(*REPORT_UNUSED_FIELDS)
    if status:
        results = results.filter(status=status)
    page = Paginator(results, REPORT_PAGE_SIZE).get_page(request.GET.get("page"))
    positions = [result.position for result in page]
    changes = changes_since(baseline, run, positions=positions) if baseline else None
    verdict = run_verdict(baseline, run, positions=positions) if baseline else None
    marks = changes["marks"] if changes else {}
    rows = [
        ReportRow(
            result,
            marks.get(result.position),
            case_detail(run, result),
            verdict.by_position.get(result.position) if verdict else None,
        )
        for result in page
    ]
    return render(
        request,
        "testruns/report.html",
        {
            "run": run,
            "stats": run_statistics(run),
            "baseline": baseline,
            "baseline_stats": run_statistics(baseline) if baseline else None,
            "changes": changes,
            "verdict": verdict,
            "reviewed": reviewed_pass_rate(run),
            "can_review": request.user.has_perm(queue.PERMISSION),
            "page": page,
            "rows": rows,
            "status": status,
            "pinned": run.card.baseline_run_id == run.pk,
            "can_pin": request.user.has_perm("testruns.change_promptcard"),
        },
    )


@require_POST
def pin_baseline(request, pk) -> HttpResponse:
    run = _run_or_404(request, pk)
    if not request.user.has_perm("testruns.change_promptcard"):
        return HttpResponseForbidden("You may not change cards.")
    unpin = request.POST.get("unpin") == "1"
    cards.pin_baseline(run.card, None if unpin else run)
    messages.success(
        request,
        f"{run.card.name}: baseline " + ("unpinned." if unpin else f"pinned to run #{run.pk}."),
    )
    return redirect("report", pk=run.pk)


def _download_name(run: TestRun, extension: str) -> str:
    return f"run-{run.pk}-{run.card.slug}.{extension}"


@require_GET
def report_csv(request, pk) -> StreamingHttpResponse:
    run = _run_or_404(request, pk)
    return download(
        request, run_csv.csv_rows(run), content_type="text/csv", filename=_download_name(run, "csv")
    )


@require_GET
def report_json(request, pk) -> StreamingHttpResponse:
    run = _run_or_404(request, pk)
    return download(
        request,
        run_json_text(run),
        content_type="application/json",
        filename=_download_name(run, "json"),
    )


@require_GET
def report_junit(request, pk) -> HttpResponse:
    run = _run_or_404(request, pk)
    response = HttpResponse(junit_xml(run), content_type="application/xml")
    response["Content-Disposition"] = f'attachment; filename="{_download_name(run, "xml")}"'
    return response
