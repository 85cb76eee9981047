"""Cards and their test cases as files, in promptfoo's format extended with what a card has:

    cards:
      - {name, slug, description, tags, system_prompt, prompts: [<template>], tests: [
          {description: <case name>, vars, assert, threshold?, tags?, enabled: false?}]}

Import also reads one card without the `cards:` wrapper, a promptfoo config (one card per
prompt, every card gets every test) and promptfoo's CSV of test cases for a chosen card. It is
all or nothing, and every problem names the file and its place (`tests[3].assert[0]`, `row 5`).

The modules: `importing` (import_cards: match, validate, save), `ours` (our format, read and
exported), `promptfoo` (its tests, defaultTest and prompts), `csv_cases` (its CSV and short
form of assertions), `parsing` (bytes to plain data), `reading` (the specs and the Reader that
collects problems) and `errors`. Other code imports only the names below, from this package.
"""

from __future__ import annotations

from testruns.catalog.card_files.csv_cases import assertion_from_short_form
from testruns.catalog.card_files.errors import CardFileError
from testruns.catalog.card_files.importing import ImportReport, import_cards
from testruns.catalog.card_files.ours import export_cards
from testruns.catalog.card_files.parsing import MAX_BYTES, UNSTORABLE_TEXT

__all__ = [
    "MAX_BYTES",
    "UNSTORABLE_TEXT",
    "CardFileError",
    "ImportReport",
    "assertion_from_short_form",
    "export_cards",
    "import_cards",
]
