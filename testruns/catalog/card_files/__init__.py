"""Cards and their test cases as files, in promptfoo's format extended with what a card has:

    cards:
      - {name, slug, description, tags, system_prompt, prompts: [<template>], tests: [
          {description: <case name>, vars, assert, threshold?, tags?, enabled: false?}]}

Import also reads one card without the `cards:` wrapper, promptfoo configs and projects (a
folder or a zip: one card per prompt, `file://` references read, see docs/promptfoo.md) and
promptfoo's CSV of test cases for a chosen card. It is all or nothing, every problem names the
file and its place (`tests[3].assert[0]`, `row 5`), stored cards change only with `update`,
and what is not imported is listed (refused with `strict`). Export writes our format, or a
promptfoo project that promptfoo runs.

The modules: `importing` (import_cards, import_project: match, validate, save), `report`,
`ours` (our format, read and exported), `promptfoo` (a config: prompts, tests, defaultTest),
`promptfoo_refs` (file:// references), `promptfoo_asserts` (assertions in our spelling),
`promptfoo_providers` (provider ids), `promptfoo_export`, `project` (a folder's or a zip's
files, safely), `csv_cases` (its CSV and short form of assertions), `parsing` (bytes to plain
data, YAML as promptfoo reads it), `reading` (the specs and the Reader that collects problems)
and `errors`. Other code imports only the names below, from this package.
"""

from __future__ import annotations

from testruns.catalog.card_files.csv_cases import assertion_from_short_form
from testruns.catalog.card_files.errors import CardFileError
from testruns.catalog.card_files.importing import import_cards, import_project
from testruns.catalog.card_files.ours import export_cards
from testruns.catalog.card_files.parsing import MAX_BYTES, UNSTORABLE_TEXT
from testruns.catalog.card_files.project import MAX_TOTAL_BYTES as MAX_UPLOAD_BYTES
from testruns.catalog.card_files.project import ProjectFiles
from testruns.catalog.card_files.promptfoo_export import (
    default_providers,
    export_promptfoo,
    export_promptfoo_zip,
)
from testruns.catalog.card_files.report import ImportReport

IMPORT_FLAGS = ("update", "strict", "create_providers")

__all__ = [
    "MAX_BYTES",
    "MAX_UPLOAD_BYTES",
    "UNSTORABLE_TEXT",
    "IMPORT_FLAGS",
    "CardFileError",
    "ImportReport",
    "ProjectFiles",
    "assertion_from_short_form",
    "default_providers",
    "export_cards",
    "export_promptfoo",
    "export_promptfoo_zip",
    "import_cards",
    "import_project",
]
