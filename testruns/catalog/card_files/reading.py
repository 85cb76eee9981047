"""What reading a file produces (a spec per card and per case, each with its place in the file)
and the Reader that every format reads with: it collects every problem with its place, so
that one import reports all of them at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from testruns.catalog.card_files.errors import CardFileError, fail
from testruns.models import PromptCard

KINDS = {bool: "boolean", int: "number", float: "number", str: "string", list: "list"}
KINDS |= {dict: "mapping", type(None): "null"}


@dataclass
class CaseSpec:
    where: str
    fields: dict[str, Any]
    assert_where: list[str]  # where each assertion came from, defaultTest's included
    field_where: dict[str, str]
    prompts: list[str] | None = None  # promptfoo's test-level `prompts`: only these prompts


@dataclass
class CardSpec:
    where: str
    fields: dict[str, Any]  # only what the file sets; an existing card keeps the rest
    cases: list[CaseSpec]
    field_where: dict[str, str] = field(default_factory=dict)
    existing: PromptCard | None = None  # the target of a CSV
    context: str = ""  # names the prompt when several cards share one list of tests


@dataclass
class Defaults:
    """promptfoo's defaultTest: its assertions come first in every test; its vars, options
    and metadata fill gaps."""

    variables: dict[str, Any] = field(default_factory=dict)
    assertions: list[Any] = field(default_factory=list)
    assert_where: list[str] = field(default_factory=list)
    threshold: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def at(where: str, step: str | int) -> str:
    """The place one step further in: `tests` and 3 give `tests[3]`, then `tests[3].vars`."""
    if isinstance(step, int):
        return f"{where}[{step}]"
    return f"{where}.{step}" if where else step


def kind_of(value: Any) -> str:
    return KINDS.get(type(value), type(value).__name__)


class Reader:
    """Turns parsed content into specs, collecting every problem with its place, and every
    part of the file it did not take (`skipped`: listed in the report, refused by --strict).
    The readers of the files a config refers to share its lists."""

    def __init__(
        self, filename: str, errors: list[str] | None = None, skipped: list[str] | None = None
    ):
        self.filename = filename
        self.errors = [] if errors is None else errors
        self.skipped = [] if skipped is None else skipped

    def add(self, where: str, message: str) -> None:
        self.errors.extend(fail(self.filename, where, message).errors)

    def skip(self, where: str, message: str) -> None:
        self.skipped.extend(fail(self.filename, where, message).errors)

    def child(self, filename: str) -> Reader:
        return Reader(filename, self.errors, self.skipped)

    def stop_if_any(self) -> None:
        if self.errors:
            raise CardFileError(self.errors)

    def get(self, item: dict, key: str, kind: str, where: str, default: Any) -> Any:
        """item[key] if it is of the kind; absent or null gives the default."""
        value = item.get(key)
        if value is None:
            return default
        if kind == "number" and kind_of(value) == kind and abs(value) < 1e300:
            return float(value)  # an int too large for a float would overflow
        if (
            kind != "number"
            and kind_of(value) == kind
            and (key != "tags" or all(isinstance(tag, str) for tag in value))
        ):
            return value
        kind += " of strings" if key == "tags" else ""
        self.add(at(where, key), f"must be a {kind}, got a {kind_of(value)}")
        return default

    def file_refs(self, value: Any, where: str, what: str = "value") -> None:
        """promptfoo reads `file://...` strings from disk; an upload has no disk to read."""
        if isinstance(value, str) and value.startswith("file://"):
            message = f"file:// references are not supported in an upload; paste the {what} instead"
            self.add(where, message)
        elif isinstance(value, dict | list):
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                self.file_refs(item, at(where, key), what)
