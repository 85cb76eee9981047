"""What promptfoo's `file://` references bring in, read from the project's files relative to the
config's folder: prompts (text files, several in one separated by `---` lines, JSON or YAML chat
messages), tests (CSV, YAML, JSON or JSONL files, globs), vars and defaultTest. Code files
(.js, .py, ...) are listed as not imported: this app does not run them."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

from testruns.catalog.card_files.csv_cases import csv_tests
from testruns.catalog.card_files.errors import CardFileError
from testruns.catalog.card_files.parsing import decode, parse
from testruns.catalog.card_files.project import ProjectFiles
from testruns.catalog.card_files.reading import Reader, at, kind_of

CODE_EXTENSIONS = {".js", ".mjs", ".cjs", ".ts", ".mts", ".py", ".rb", ".go", ".sh"}
PROMPT_DELIMITER = "---"


@dataclass
class PromptSpec:
    template: str
    system: str
    label: str
    where: str


@dataclass
class TestItem:
    """One test as promptfoo wrote it, with where it came from and its file's reader."""

    data: Any
    where: str
    reader: Reader
    assert_where: list[str] | None = None  # a CSV row's assertions sit in its columns


class Source:
    """The config's reader, the project's files (None: a lone uploaded file) and the config's
    folder inside the project."""

    def __init__(self, reader: Reader, files: ProjectFiles | None, folder: str):
        self.reader, self.files, self.folder = reader, files, folder

    def load(self, ref: str, where: str, what: str) -> list[tuple[str, str]]:
        """(project path, text) of each file a reference names; problems are reported."""
        if self.files is None:
            self.reader.add(
                where,
                f"{ref} names a file, and a single uploaded file has none beside it: import "
                f"the project's folder (CLI) or a .zip of it to read the {what}",
            )
            return []
        try:
            paths = self.files.resolve(self.folder, ref.removeprefix("file://").split(":")[0])
        except ValueError as exc:
            self.reader.add(where, f"{ref}: {exc}")
            return []
        if not paths:
            self.reader.add(where, f"{ref}: no file matches")
        found = []
        for path in paths:
            if posixpath.splitext(path)[1].lower() in CODE_EXTENSIONS:
                self.reader.skip(where, f"{ref}: code files are not run here ({what})")
                continue
            try:
                found.append((path, decode(self.files.read(path), path)))
            except OSError as exc:
                self.reader.add(where, f"{ref}: {path} cannot be read: {exc}")
            except CardFileError as exc:
                self.reader.errors.extend(exc.errors)
        return found

    def data(self, path: str, text: str) -> Any:
        """A YAML or JSON file's content; None after reporting its syntax error."""
        suffix = ".json" if path.endswith(".json") else ".yaml"
        try:
            return parse(text, suffix, path)
        except CardFileError as exc:
            self.reader.errors.extend(exc.errors)
            return None


def read_prompts(source: Source, prompts: Any) -> list[PromptSpec]:
    if isinstance(prompts, dict) and not prompts.keys() & {"raw", "id", "label"}:
        prompts = [{"raw": raw, "label": label} for raw, label in prompts.items()]  # {path: label}
    prompts = [prompts] if isinstance(prompts, str | dict) else prompts
    if not isinstance(prompts, list) or not prompts:
        source.reader.add("prompts", "must be a list with at least one prompt")
        return []
    found: list[PromptSpec] = []
    for i, prompt in enumerate(prompts):
        where, label, text = at("prompts", i), "", prompt
        if isinstance(prompt, dict):
            text, label = prompt.get("raw", prompt.get("id")), prompt.get("label") or ""
            where = at(where, "raw" if "raw" in prompt else "id")
            for key in prompt.keys() - {"raw", "id", "label"}:
                source.reader.skip(at(at("prompts", i), key), "prompt options are not imported")
        if not isinstance(text, str) or not isinstance(label, str):
            source.reader.add(where, "a prompt must be text, or a mapping with `raw:` and `label:`")
        elif text.startswith("file://"):
            for path, body in source.load(text, where, "prompt"):
                found += _prompts_in_file(source, path, body, f"{where} ({path})", label)
        else:
            found += _prompt(source, _maybe_chat(text), where, label)
    return found


def _maybe_chat(text: str) -> Any:
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def _prompts_in_file(source: Source, path: str, body: str, where: str, label: str) -> list:
    extension = posixpath.splitext(path)[1].lower()
    if extension == ".jsonl":
        lines = [line for line in body.splitlines() if line.strip()]
        chats = [source.data(path + ".json", line) for line in lines]
        return [
            p for n, chat in enumerate(chats) for p in _prompt(source, chat, at(where, n), label)
        ]
    if extension in (".json", ".yaml", ".yml"):
        return _prompt(source, source.data(path, body), where, label)
    parts = _split(body)
    if len(parts) == 1:
        return _prompt(source, parts[0], where, label)
    return [
        p
        for n, part in enumerate(parts)
        for p in _prompt(source, part, at(where, n), label and f"{label} {n + 1}")
    ]


def _split(text: str) -> list[str]:
    """A text file's prompts: separated by lines holding only `---`, each trimmed."""
    parts, current = [], []
    for line in text.splitlines():
        if line.strip() == PROMPT_DELIMITER:
            parts.append("\n".join(current))
            current = []
        else:
            current.append(line)
    parts.append("\n".join(current))
    return [part.strip() for part in parts if part.strip()]


def _prompt(source: Source, content: Any, where: str, label: str) -> list[PromptSpec]:
    if isinstance(content, str):
        return [PromptSpec(content, "", label, where)]
    if content is None:
        return []
    messages = content if isinstance(content, list) else None
    roles = [m.get("role") for m in messages or [] if isinstance(m, dict)]
    texts = [m.get("content") for m in messages or [] if isinstance(m, dict)]
    if (
        messages is None
        or len(roles) != len(messages)
        or not all(isinstance(text, str) for text in texts)
        or roles not in (["user"], ["system", "user"])
    ):
        shape = (
            f"{len(messages)} messages ({', '.join(map(str, roles))})"
            if messages
            else kind_of(content)
        )
        source.reader.skip(
            where,
            f"a chat prompt of {shape}: a card holds one system prompt and one user template, "
            "so only [user] and [system, user] chats are imported",
        )
        return []
    system = texts[0] if roles[0] == "system" else ""
    return [PromptSpec(texts[-1], system, label, where)]


def read_test_items(source: Source, tests: Any, where: str = "tests") -> list[TestItem]:
    """Every test, inline or from files, in order."""
    if tests is None:
        return []
    entries = [tests] if isinstance(tests, str) else tests
    if not isinstance(entries, list):
        source.reader.add(where, f"must be a list of tests or a file://, got a {kind_of(tests)}")
        return []
    items: list[TestItem] = []
    for i, entry in enumerate(entries):
        place = where if isinstance(tests, str) else at(where, i)
        if isinstance(entry, str) and entry.startswith("file://"):
            for path, body in source.load(entry, place, "tests"):
                items += _tests_in_file(source, path, body)
        else:
            items.append(TestItem(entry, place, source.reader))
    return items


def _tests_in_file(source: Source, path: str, body: str) -> list[TestItem]:
    """A file's tests; each one's place names the file (`tests/cases.csv row 3`), since the
    config's reader reports what is wrong with it."""
    extension = posixpath.splitext(path)[1].lower()
    if extension == ".csv":
        return [
            TestItem(test, f"{path} {where}", source.reader, [f"{path} {w}" for w in places])
            for test, where, places in csv_tests(source.reader.child(path), body)
        ]
    if extension == ".jsonl":
        docs = [source.data(path + ".json", line) for line in body.splitlines() if line.strip()]
        return [TestItem(doc, f"{path} line {n + 1}", source.reader) for n, doc in enumerate(docs)]
    if extension not in (".json", ".yaml", ".yml"):
        source.reader.skip(path, f"tests in {extension or 'extensionless'} files are not read")
        return []
    doc = source.data(path, body)
    docs = doc if isinstance(doc, list) else [doc]
    return [
        TestItem(item, f"{path}[{n}]" if isinstance(doc, list) else path, source.reader)
        for n, item in enumerate(docs)
    ]


def read_vars(source: Source, reader: Reader, variables: Any, where: str) -> dict[str, Any]:
    """A test's vars, with `file://` values read (text as text, YAML and JSON as JSON text, as
    promptfoo passes them) and a `file://` mapping of vars loaded."""
    if isinstance(variables, str) and variables.startswith("file://"):
        loaded = [source.data(path, body) for path, body in source.load(variables, where, "vars")]
        variables = loaded[0] if loaded else {}
    if variables is None:
        return {}
    if not isinstance(variables, dict):
        reader.add(where, f"must be a mapping, got a {kind_of(variables)}")
        return {}
    found = {}
    for name, value in variables.items():
        if isinstance(value, str) and value.startswith("file://"):
            bodies = source.load(value, at(where, name), "variable")
            if not bodies:
                continue
            path, body = bodies[0]
            if path.endswith((".json", ".yaml", ".yml")):
                body = json.dumps(source.data(path, body), ensure_ascii=False)
            value = body
        found[name] = value
    return found


def read_default(source: Source, default: Any) -> dict[str, Any]:
    """defaultTest as a mapping, from the config or its file."""
    if isinstance(default, str) and default.startswith("file://"):
        loaded = [
            source.data(path, body)
            for path, body in source.load(default, "defaultTest", "default test")
        ]
        default = loaded[0] if loaded else {}
    if default is None:
        return {}
    if not isinstance(default, dict):
        source.reader.add("defaultTest", f"must be a mapping, got a {kind_of(default)}")
        return {}
    return default
