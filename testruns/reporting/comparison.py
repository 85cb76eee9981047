"""Runs side by side: cases as rows, runs as columns, for the comparison page. Rows line up by
`baselines.case_key`; statuses load first and detail only for the page of rows shown.
"""

from __future__ import annotations

from django.db.models import Q

from testruns.models import TestResult, TestRun
from testruns.reporting.baselines import case_key


def side_by_side(runs: list[TestRun], *, differences_only: bool = False) -> list[dict]:
    """Cases as rows, runs as columns: [{"key", "case_name", "cells": [result|None, ...],
    "differs"}], in case order. Loads statuses first and detail only for the rows asked
    for, so the caller pages the list and fills in `cells` with `fill_cells`."""
    rows: dict[str, dict] = {}
    for column, run in enumerate(runs):
        for case_id, name, position, status in run.results.values_list(
            "case_id", "case_name", "position", "status"
        ):
            key = case_key(case_id, name)
            row = rows.setdefault(
                key,
                {
                    "key": key,
                    "case_name": name,
                    "position": position,
                    "statuses": [None] * len(runs),
                },
            )
            row["statuses"][column] = status
    ordered = sorted(rows.values(), key=lambda r: (r["position"], r["case_name"]))
    for row in ordered:
        row["differs"] = len(set(row["statuses"])) > 1
    return [row for row in ordered if row["differs"]] if differences_only else ordered


def fill_cells(runs: list[TestRun], rows: list[dict]) -> None:
    """Load the results behind one page of side_by_side() rows (one query per run)."""
    keys = {row["key"] for row in rows}
    by_key: dict[tuple[int, str], TestResult] = {}
    for run in runs:
        case_ids = [int(k[1:]) for k in keys if k.startswith("c")]
        names = [k[2:] for k in keys if k.startswith("n:")]
        for result in run.results.filter(
            Q(case_id__in=case_ids) | Q(case_id=None, case_name__in=names)
        ):
            by_key[(run.pk, case_key(result.case_id, result.case_name))] = result
    for row in rows:
        row["cells"] = [by_key.get((run.pk, row["key"])) for run in runs]
