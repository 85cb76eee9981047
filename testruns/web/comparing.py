"""Runs side by side: any runs picked in the history (or typed as ?runs=12,15), or the runs of
one comparison group (a launch on several providers). Every run is looked up through
`runs_visible_to`, so a run the user may not see is left out."""

from __future__ import annotations

from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET

from testruns.models import TestRun
from testruns.reporting.access import runs_visible_to
from testruns.reporting.comparison import fill_cells, paginate, prompt_changes, side_by_side
from testruns.reporting.verdicts import Verdict, run_verdict

COMPARE_PAGE_SIZE = 50
MAX_COMPARED_RUNS = 8


def _run_ids(values: list[str]) -> list[int]:
    parts = [part for value in values for part in value.replace(" ", "").split(",")]
    return list(dict.fromkeys(int(p) for p in parts if p.isascii() and p.isdigit() and len(p) < 19))


@require_GET
def compare(request) -> HttpResponse:
    """Any two or more runs side by side: GET ?runs=1,2,3[&diff=1], the first run being the
    one the others are compared with.

    1. Runs picked with the history's checkboxes come as ?runs=3&runs=1: they are put oldest
       first (the earlier run is the reference) and the page redirects to the comma form, an
       address that can be shared and that the page's own links keep.
    2. One query for the runs: the first MAX_COMPARED_RUNS the user may see, in the URL's
       order.
    """
    picked = request.GET.getlist("runs")
    if len(picked) > 1:
        query = request.GET.copy()
        query.setlist("runs", [",".join(str(pk) for pk in sorted(_run_ids(picked)))])
        query.pop("page", None)
        return redirect(reverse("compare") + "?" + query.urlencode(safe=","))
    ids = _run_ids(picked)
    found = runs_visible_to(request.user).in_bulk(ids)
    runs = [found[pk] for pk in ids if pk in found][:MAX_COMPARED_RUNS]
    return _compare_page(request, runs, group=None)


@require_GET
def comparison(request, group) -> HttpResponse:
    runs = list(
        runs_visible_to(request.user)
        .filter(comparison_group=group)
        .order_by("provider__name", "pk")
    )
    if not runs:
        raise Http404("No such comparison.")
    return _compare_page(request, runs, group=group)


def _compare_page(request, runs: list[TestRun], *, group) -> HttpResponse:
    differences_only = request.GET.get("diff") == "1"
    rows = side_by_side(runs, differences_only=differences_only)
    page = paginate(rows, request.GET.get("page"), COMPARE_PAGE_SIZE)
    fill_cells(runs, list(page))
    verdicts = verdicts_against_the_first(runs, list(page))
    query = request.GET.copy()
    query.pop("page", None)
    cards = list(dict.fromkeys(run.card_id for run in runs))
    return render(
        request,
        "testruns/compare.html",
        {
            "runs": runs,
            "page": page,
            "differences_only": differences_only,
            "group": group,
            "query": query.urlencode(safe=","),
            "run_ids": ",".join(str(run.pk) for run in runs),
            "self_url": reverse("comparison", args=[group]) if group else reverse("compare"),
            "prompt_changes": prompt_changes(runs),
            "heads": list(zip(runs, verdicts, strict=True)),
            # Where to pick (other) runs: the card's runs when they are all of one card.
            "pick_url": reverse("history") + (f"?card={cards[0]}" if len(cards) == 1 else ""),
        },
    )


def verdicts_against_the_first(runs: list[TestRun], rows: list[dict]) -> list[Verdict | None]:
    """Each finished run's verdict against the first one (reporting.verdicts: what chance
    does not explain), None for the first and for runs still going; each row's column gets
    its case's verdict (`column["verdict"]`)."""
    verdicts: list[Verdict | None] = [None] * len(runs)
    if not runs or not runs[0].is_finished:
        return verdicts
    for i, run in enumerate(runs[1:], start=1):
        if not run.is_finished:
            continue
        positions = [row["cells"][i].position for row in rows if row["cells"][i] is not None]
        verdicts[i] = run_verdict(runs[0], run, positions=positions)
        by_key = verdicts[i].by_key()
        for row in rows:
            if row["columns"][i]:
                row["columns"][i]["verdict"] = by_key.get(row["key"])
    return verdicts
