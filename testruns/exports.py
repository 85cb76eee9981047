"""A run's report as files: CSV (here), JSON and JUnit XML (from `testruns.reports`, which the
API shares, when it is there; the fallbacks below keep the same signatures).

Outputs are untrusted text: the XML writer escapes them, and CSV cells that a spreadsheet
would read as a formula are prefixed with an apostrophe.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from xml.etree import ElementTree

from testruns.models import TestResult, TestRun

CSV_COLUMNS = ["position", "case", "status", "score", "latency_ms", "tokens_in", "tokens_out",
               "cost", "attempts", "cached", "assertions", "error", "output", "variables"]
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# Characters XML 1.0 cannot hold at all, even escaped (models do emit control characters).
XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class _Echo:
    def write(self, value: str) -> str:
        return value


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def assertion_summary(outcomes: list[dict]) -> str:
    return "; ".join(f"{o.get('type')}: {'pass' if o.get('passed') else 'fail'}"
                     + (f" ({o['reason']})" if o.get("reason") else "") for o in outcomes)


def csv_rows(run: TestRun) -> Iterator[str]:
    """The per-case table, one line at a time (a 10,000-case run streams)."""
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_COLUMNS)
    for r in run.results.order_by("position").iterator(chunk_size=500):
        yield writer.writerow([_cell(v) for v in (
            r.position + 1, r.case_name, r.status, r.score, r.latency_ms, r.tokens_in,
            r.tokens_out, r.cost, r.attempts, r.cached, assertion_summary(r.assertion_results),
            r.error, r.output, json.dumps(r.variables, ensure_ascii=False))])


def run_json(run: TestRun) -> dict:
    return {
        "id": run.pk, "card": run.card.slug, "version": run.version.number,
        "provider": run.provider.name, "status": run.status,
        "queued_at": run.queued_at.isoformat(),
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "totals": {"cases": run.total_cases, "passed": run.passed_count,
                   "failed": run.failed_count, "errors": run.error_count,
                   "tokens_in": run.tokens_in, "tokens_out": run.tokens_out,
                   "cost": str(run.cost)},
        "results": [{
            "position": r.position, "case": r.case_name, "status": r.status, "score": r.score,
            "output": r.output, "error": r.error, "latency_ms": r.latency_ms,
            "tokens_in": r.tokens_in, "tokens_out": r.tokens_out, "cost": str(r.cost),
            "assertions": r.assertion_results, "variables": r.variables,
        } for r in run.results.order_by("position")],
    }


def _xml(text: str | None) -> str:
    return XML_INVALID.sub("\ufffd", text or "")


def junit_xml(run: TestRun) -> str:
    suite = ElementTree.Element("testsuite", {
        "name": f"{run.card.slug} v{run.version.number} on {run.provider.name}",
        "tests": str(run.total_cases), "failures": str(run.failed_count),
        "errors": str(run.error_count),
        "skipped": str(run.results.filter(status=TestResult.Status.SKIPPED).count()),
    })
    for r in run.results.order_by("position"):
        case = ElementTree.SubElement(suite, "testcase", {
            "classname": run.card.slug, "name": _xml(r.case_name),
            "time": f"{(r.latency_ms or 0) / 1000:.3f}"})
        if r.status == TestResult.Status.FAILED:
            failure = ElementTree.SubElement(case, "failure", {
                "message": _xml(assertion_summary([o for o in r.assertion_results
                                                   if not o.get("passed")]))})
            failure.text = _xml(r.output)
        elif r.status == TestResult.Status.ERROR:
            ElementTree.SubElement(case, "error", {"message": _xml(r.error)}).text = _xml(r.error)
        elif r.status in (TestResult.Status.SKIPPED, TestResult.Status.PENDING,
                          TestResult.Status.RUNNING):
            ElementTree.SubElement(case, "skipped")
        ElementTree.SubElement(case, "system-out").text = _xml(r.output)
    return ElementTree.tostring(suite, encoding="unicode", xml_declaration=True)
