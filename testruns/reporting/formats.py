"""A run as a report: JUnit XML for CI systems and a JSON document for programs. Plain
functions of runs, shared by the CLI, the API and the report pages.

JUnit mapping: one <testsuite> per run (named "<card slug> @ <provider>"), one <testcase> per
case; a failed case carries <failure> with the assertions that failed, a provider or template
error <error>, a skipped or never-run case <skipped>. The output goes in <system-out>.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from decimal import Decimal

from django.core.serializers.json import DjangoJSONEncoder

from testruns.models import TestResult, TestRun
from testruns.reporting import statistics
from testruns.reporting.history import run_statistics

# XML 1.0 cannot hold these characters at all, escaped or not.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
MESSAGE_CHARS = 500
RESULT_FIELDS = [
    "id", "position", "case_id", "case_name", "status", "variables", "prompt", "output",
    "assertion_results", "score", "latency_ms", "tokens_in", "tokens_out", "cost", "attempts",
    "retries", "repeat_passes", "repeat_results", "cached", "error", "started_at", "finished_at",
]  # fmt: skip


def _xml_text(value: object) -> str:
    return _NOT_XML.sub("\ufffd", "" if value is None else str(value))


def _results(run: TestRun) -> Iterator[TestResult]:
    return run.results.order_by("position").iterator(chunk_size=500)


def failed_assertions(result: TestResult) -> list[str]:
    """The reasons of the assertions that did not pass, e.g. "contains: 'x' not found"."""
    return [
        f"{outcome.get('type', '?')}: {outcome.get('reason', '')}"
        for outcome in result.assertion_results or []
        if isinstance(outcome, dict) and not outcome.get("passed")
    ]


def suite_name(run: TestRun) -> str:
    return f"{run.card.slug} @ {run.provider.name}"


def _testcase(suite: ET.Element, run: TestRun, result: TestResult) -> None:
    seconds = (result.latency_ms or 0) / 1000
    case = ET.SubElement(
        suite,
        "testcase",
        name=_xml_text(result.case_name),
        classname=_xml_text(run.card.slug),
        time=f"{seconds:.3f}",
    )
    if result.status == TestResult.Status.FAILED:
        reasons = failed_assertions(result) or ["the case did not pass"]
        element = ET.SubElement(
            case,
            "failure",
            type="AssertionFailed",
            message=_xml_text("; ".join(reasons))[:MESSAGE_CHARS],
        )
        element.text = _xml_text("\n".join(reasons))
    elif result.status == TestResult.Status.ERROR:
        element = ET.SubElement(
            case, "error", type="ProviderError", message=_xml_text(result.error)[:MESSAGE_CHARS]
        )
        element.text = _xml_text(result.error)
    elif result.status != TestResult.Status.PASSED:
        message = "skipped" if result.status == TestResult.Status.SKIPPED else "not run"
        ET.SubElement(case, "skipped", message=message)
    if result.output:
        ET.SubElement(case, "system-out").text = _xml_text(result.output)


def _testsuite(parent: ET.Element, run: TestRun) -> dict[str, int]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    suite = ET.SubElement(
        parent,
        "testsuite",
        name=_xml_text(suite_name(run)),
        timestamp=(run.started_at or run.queued_at).isoformat(),
    )
    properties = ET.SubElement(suite, "properties")
    for name, value in [
        ("run_id", run.pk),
        ("status", run.status),
        ("card", run.card.slug),
        ("version", run.version.number),
        ("provider", run.provider.name),
        ("model", run.provider.model),
    ]:
        ET.SubElement(properties, "property", name=name, value=_xml_text(value))
    total_seconds = 0.0
    for result in _results(run):
        _testcase(suite, run, result)
        counts["tests"] += 1
        counts["failures"] += result.status == TestResult.Status.FAILED
        counts["errors"] += result.status == TestResult.Status.ERROR
        counts["skipped"] += result.status not in statistics.EVALUATED
        total_seconds += (result.latency_ms or 0) / 1000
    for key, value in counts.items():
        suite.set(key, str(value))
    suite.set("time", f"{total_seconds:.3f}")
    return counts


def junit_xml_of_runs(runs: Iterable[TestRun], *, name: str = "prompt-card-runner") -> str:
    root = ET.Element("testsuites", name=_xml_text(name))
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for run in runs:
        for key, value in _testsuite(root, run).items():
            totals[key] += value
    for key, value in totals.items():
        root.set(key, str(value))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def junit_xml(run: TestRun) -> str:
    """One run as a JUnit XML document."""
    return junit_xml_of_runs([run], name=suite_name(run))


def _plain(value: object) -> object:
    if isinstance(value, Decimal):
        return float(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def run_summary(run: TestRun) -> dict:
    """run_json() without its results: what ran, its totals and statistics."""
    stats = {key: _plain(value) for key, value in run_statistics(run).items()}
    return {
        "run": {
            "id": run.pk,
            "status": run.status,
            "card": run.card.slug,
            "card_name": run.card.name,
            "version": run.version.number,
            "provider": run.provider.name,
            "model": run.provider.model,
            "priority": run.priority,
            "launched_by": run.launched_by.get_username() if run.launched_by else None,
            "config": {
                "max_concurrent_tests": run.max_concurrent_tests,
                "timeout_seconds": run.timeout_seconds,
                "stop_on_failure": run.stop_on_failure,
                "max_retries": run.max_retries,
                "use_cache": run.use_cache,
                "repeats": run.repeats,
                "grader_provider": (run.grader_provider or run.provider).name,
            },
            "queued_at": _plain(run.queued_at),
            "started_at": _plain(run.started_at),
            "finished_at": _plain(run.finished_at),
            "error_message": run.error_message,
            "total_cases": run.total_cases,
            "done_count": run.done_count,
            "passed_count": run.passed_count,
            "failed_count": run.failed_count,
            "error_count": run.error_count,
            "tokens_in": run.tokens_in,
            "tokens_out": run.tokens_out,
            "cost": _plain(run.cost),
        },
        "statistics": stats,
        "reviewed": statistics.reviewed_pass_rate(run),
    }


# A result's review as exports carry it (None when it was never sent to review).
REVIEW_FIELDS = {
    "review__verdict": "verdict",
    "review__note": "note",
    "review__reviewer__username": "reviewer",
    "review__reviewed_at": "reviewed_at",
    "review__reason": "reason",
}


def results_json(run: TestRun) -> Iterator[dict]:
    """The run's results as JSON-ready dicts of RESULT_FIELDS, in case order, read a chunk at
    a time as plain values (building a model instance per row took half the time); each with
    its review beside the automatic verdict (`status`), never in its place."""
    rows = run.results.order_by("position").values(*RESULT_FIELDS, *REVIEW_FIELDS)
    for row in rows.iterator(chunk_size=500):
        review = {name: _plain(row.pop(field)) for field, name in REVIEW_FIELDS.items()}
        plain = {field: _plain(value) for field, value in row.items()}
        yield plain | {"review": review if review["reason"] else None}


def run_json(run: TestRun) -> dict:
    """One run as a JSON-ready document: what ran, its totals and statistics, every result."""
    return run_summary(run) | {"results": list(results_json(run))}


def run_json_text(run: TestRun, *, indent: int = 2) -> Iterator[str]:
    """run_json() as text, a result at a time: the very characters of
    `json.dumps(run_json(run), indent=indent, cls=DjangoJSONEncoder)` (what the report page's
    JSON download always was), without holding every result in memory at once."""
    head = json.dumps(run_summary(run) | {"results": []}, indent=indent, cls=DjangoJSONEncoder)
    # "results" is the last key, so the dump ends with its empty list and the closing brace.
    yield head[: -len("[]\n}")]
    # Each result sits two levels deep: its own dump, every line indented twice more.
    margin = "\n" + " " * (2 * indent)
    separator = "[" + margin
    encoder = DjangoJSONEncoder(indent=indent)
    for result in results_json(run):
        yield separator + encoder.encode(result).replace("\n", margin)
        separator = "," + margin
    yield "[]\n}" if separator.startswith("[") else "\n" + " " * indent + "]\n}"


def pass_rate(runs: Iterable[TestRun]) -> float | None:
    """`statistics.pass_rate` of the runs' counts added up (passed over evaluated cases
    across them); None when nothing was evaluated."""
    passed = failed = errors = 0
    for run in runs:
        passed += run.passed_count
        failed += run.failed_count
        errors += run.error_count
    return statistics.pass_rate(passed, failed, errors)
