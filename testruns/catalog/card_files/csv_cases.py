"""promptfoo's CSV of test cases (a tests file of a config, or cases for a chosen card) and its
short form of assertions."""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

from testruns.catalog.assertions import ASSERTION_TYPES
from testruns.catalog.card_files.reading import Reader

# CSV short forms (`contains: foo`) know promptfoo's types too, so that one we lack is reported
# as unsupported instead of silently becoming an `equals` of the whole text.
SHORT_FORM_TYPES = {t.removeprefix("not-") for t in ASSERTION_TYPES} | {
    "answer-relevance", "bleu", "classifier", "contains-html", "contains-json", "contains-sql",
    "contains-xml", "context-faithfulness", "context-recall", "context-relevance", "factuality",
    "g-eval", "icontains-all", "icontains-any", "is-html", "is-refusal", "is-sql", "is-xml",
    "meteor", "moderation", "perplexity", "perplexity-score", "rouge-n", "similar",
}  # fmt: skip
# promptfoo's spellings of code assertions: `fn:` and `eval:` are javascript; python is kept as
# such so that the import lists it as refused, with why.
CODE_TYPES = {"javascript": "javascript", "fn": "javascript", "eval": "javascript"}
CODE_TYPES |= {"python": "python", "py": "python"}
CSV_SPECIAL_COLUMN = re.compile(r"__(description|threshold|expected\d*|metadata:.+)")
SHORT_FORM = re.compile(r"(not-)?([a-z][a-z0-9-]*)(\(\d+(?:\.\d+)?\))?(?::\s*(.*))?", re.S)
LIST_VALUED = {"contains-any", "contains-all", "icontains-any", "icontains-all"}
JSON_VALUED = {"is-json", "json-schema", "json-path", "levenshtein", "word-count", "latency"}


def csv_tests(reader: Reader, text: str) -> list[tuple[dict[str, Any], str, list[str]]]:
    """promptfoo's CSV as promptfoo tests: each column is a variable except `__description`,
    `__expected*` (assertions in short form), `__threshold` and `__metadata:<key>` (and
    `__metadata:<key>[]`, comma-separated). Rows are numbered as a spreadsheet numbers them:
    the header is row 1. Returns (test, its place, each assertion's place)."""
    rows_reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(rows_reader)]
        rows = [(n, cells) for n, cells in enumerate(rows_reader, start=2) if any(cells)]
    except StopIteration:
        reader.add("", "the file is empty; expected a header row")
        return []
    except csv.Error as exc:
        reader.add(f"line {rows_reader.line_num}", str(exc))
        return []
    ignored = set()
    for i, name in enumerate(header):
        if not name or header.index(name) != i:
            reader.add("row 1", f"column {i + 1} {f'repeats {name}' if name else 'has no name'}")
        elif name.startswith("__") and not CSV_SPECIAL_COLUMN.fullmatch(name):
            reader.skip("row 1", f"column {name} is not imported: {_column_reason(name)}")
            ignored.add(name)
    reader.stop_if_any()
    return [_row_test(reader, header, ignored, cells, f"row {n}") for n, cells in rows]


def _column_reason(name: str) -> str:
    if name in ("__prefix", "__suffix"):
        return "it changes the prompt per test, and a card has one template"
    return "not a column this app knows"


def _row_test(
    reader: Reader, header: list[str], ignored: set[str], cells: list[str], where: str
) -> tuple[dict[str, Any], str, list[str]]:
    if any(cells[len(header) :]):
        reader.add(where, f"has {len(cells)} cells but the header has {len(header)} columns")
    row = dict(zip(header, cells + [""] * len(header), strict=False))  # short rows: blanks
    test: dict[str, Any] = {"description": row.pop("__description", "") or where}
    if threshold := row.pop("__threshold", "").strip():
        try:
            test["threshold"] = float(threshold)
        except ValueError:
            reader.add(f"{where}, __threshold", f"{threshold!r} is not a number")
    assertions, assert_where = [], []
    for column in [name for name in header if name.startswith("__expected")]:
        if cell := row.pop(column).strip():
            try:
                assertions.append(assertion_from_short_form(cell))
                assert_where.append(f"{where}, {column}")
            except ValueError as exc:
                reader.add(f"{where}, {column}", str(exc))
    metadata: dict[str, Any] = {}
    for column in [name for name in header if name.startswith("__metadata:")]:
        key, cell = column.removeprefix("__metadata:"), row.pop(column).strip()
        if key.endswith("[]") and cell:
            metadata[key[:-2]] = [item.strip() for item in cell.split(",") if item.strip()]
        elif cell:
            metadata[key] = cell
    for name in ignored:
        row.pop(name, None)
    test |= {"vars": row, "assert": assertions}
    if metadata:
        test["metadata"] = metadata
    return test, where, assert_where


def assertion_from_short_form(text: str) -> dict[str, Any]:
    """promptfoo's CSV shorthand (`contains: foo`, `is-json`, `not-regex: ^a`, `grade: ...`,
    `similar(0.8): text`, `javascript: output.length < 9`) as a promptfoo assertion; text with
    no known type in front means `equals`. ValueError for a file:// value."""
    text = "llm-rubric:" + text.removeprefix("grade:") if text.startswith("grade:") else text
    if text.startswith("file://"):
        raise ValueError("file:// assertions run code from a file and are not supported here")
    match = SHORT_FORM.fullmatch(text)
    name = match[2] if match else None
    if name in CODE_TYPES and match[4] is not None:
        return {"type": (match[1] or "") + CODE_TYPES[name], "value": match[4]}
    if name not in SHORT_FORM_TYPES:
        return {"type": "equals", "value": text}
    spec: dict[str, Any] = {"type": (match[1] or "") + name}
    if match[3]:
        spec["threshold"] = float(match[3][1:-1])
    value = match[4]
    if name in LIST_VALUED and value is not None:
        spec["value"] = [item.strip() for item in value.split(",")]
    elif name in JSON_VALUED and value:  # e.g. `latency: 500`, an `is-json` schema
        try:
            spec["value"] = json.loads(value)
        except ValueError:
            spec["value"] = value
    elif value is not None and (value or name not in JSON_VALUED):
        spec["value"] = value
    return spec
