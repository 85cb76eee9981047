"""promptfoo's CSV of test cases, for one chosen card, and its short form of assertions."""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

from testruns.catalog.assertions import ASSERTION_TYPES
from testruns.catalog.card_files.reading import CaseSpec, Reader

# CSV short forms (`contains: foo`) know promptfoo's types too, so that one we lack is reported
# as unsupported instead of silently becoming an `equals` of the whole text.
SHORT_FORM_TYPES = {t.removeprefix("not-") for t in ASSERTION_TYPES} | {
    "answer-relevance", "bleu", "classifier", "contains-html", "contains-json", "contains-sql",
    "contains-xml", "context-faithfulness", "context-recall", "context-relevance", "factuality",
    "g-eval", "icontains-all", "icontains-any", "is-html", "is-refusal", "is-sql", "is-xml",
    "meteor", "moderation", "perplexity", "perplexity-score", "rouge-n", "similar",
}  # fmt: skip
CODE_TYPES = {"javascript", "fn", "eval", "python", "ruby", "webhook", "file"}
CSV_SPECIAL_COLUMN = re.compile(r"__(description|threshold|expected\d*)")
SHORT_FORM = re.compile(r"(not-)?([a-z][a-z0-9-]*)(\(\d+(?:\.\d+)?\))?(?::\s*(.*))?", re.S)
LIST_VALUED = {"contains-any", "contains-all", "icontains-any", "icontains-all"}
JSON_VALUED = {"is-json", "json-schema", "json-path", "levenshtein", "word-count", "latency"}


def read_csv(reader: Reader, text: str) -> list[CaseSpec]:
    """promptfoo's CSV: each column is a variable except `__description`, `__expected*`
    (assertions in short form) and `__threshold`. Rows are numbered as a spreadsheet
    numbers them: the header is row 1."""
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
    for i, name in enumerate(header):
        if not name or header.index(name) != i:
            reader.add("row 1", f"column {i + 1} {f'repeats {name}' if name else 'has no name'}")
        elif name.startswith("__") and not CSV_SPECIAL_COLUMN.fullmatch(name):
            reader.add("row 1", f"column {name} is not supported")
    reader.stop_if_any()
    return [_read_row(reader, header, cells, f"row {n}") for n, cells in rows]


def _read_row(reader: Reader, header: list[str], cells: list[str], where: str) -> CaseSpec:
    if any(cells[len(header) :]):
        reader.add(where, f"has {len(cells)} cells but the header has {len(header)} columns")
    row = dict(zip(header, cells + [""] * len(header), strict=False))  # short rows: blanks
    fields = {"name": row.pop("__description", "") or where, "threshold": None}
    if threshold := row.pop("__threshold", "").strip():
        try:
            fields["threshold"] = float(threshold)
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
    reader.file_refs(row, where)
    fields |= {"variables": row, "assertions": assertions}
    field_where = {"name": f"{where}, __description", "threshold": f"{where}, __threshold"}
    return CaseSpec(where, fields, assert_where, field_where)


def assertion_from_short_form(text: str) -> dict[str, Any]:
    """promptfoo's CSV shorthand (`contains: foo`, `is-json`, `not-regex: ^a`, `grade: ...`);
    text with no known type in front means `equals`. ValueError for what we cannot honour."""
    text = "llm-rubric:" + text.removeprefix("grade:") if text.startswith("grade:") else text
    match = SHORT_FORM.fullmatch(text)
    name = match[2] if match else None
    if name in CODE_TYPES or text.startswith("file://"):
        raise ValueError(f"{name or 'file://'} assertions run code and are not supported here")
    if name not in SHORT_FORM_TYPES:
        return {"type": "equals", "value": text}
    if match[3]:
        raise ValueError(f"a threshold in {name}{match[3]} is not supported")
    spec: dict[str, Any] = {"type": (match[1] or "") + name}
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
