"""What an import did, and what it says about what it did not do."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

UPDATE_HINT = (
    "these cards exist already and the import would change them; nothing was imported. "
    "Import again with update (--update, the admin's checkbox, the API's `update`) to apply"
)


@dataclass
class ImportReport:
    """What an import did; "updated" counts only rows that changed. `not_imported` names every
    part of the files that was not taken, with its place and why; `changes` what an update
    changed; `providers_found` the promptfoo providers that match one stored here,
    `providers_missing` those that do not (what to create), `providers_created` those it
    created (disabled)."""

    cards_created: int = 0
    cards_updated: int = 0
    cards_unchanged: int = 0
    cases_created: int = 0
    cases_updated: int = 0
    cases_unchanged: int = 0
    versions_created: int = 0
    not_imported: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    providers_found: list[str] = field(default_factory=list)
    providers_missing: list[dict[str, Any]] = field(default_factory=list)
    providers_created: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"cards: {self.cards_created} created, {self.cards_updated} updated, "
            f"{self.cards_unchanged} unchanged; cases: {self.cases_created} created, "
            f"{self.cases_updated} updated, {self.cases_unchanged} unchanged; "
            f"{self.versions_created} new prompt versions"
        )

    def details(self) -> list[str]:
        """Lines for people: the summary's companions, each prefixed with what it is."""
        lines = [f"changed: {line}" for line in self.changes]
        lines += [f"not imported: {line}" for line in self.not_imported]
        lines += [f"provider: {line}" for line in self.providers_found]
        lines += [f"provider created (disabled): {name}" for name in self.providers_created]
        lines += [
            f"provider to create: {p['id']} (kind {p['kind']}, model {p['model']}"
            + (f", base URL {p['base_url']}" if p["base_url"] else "")
            + (f", key variable {p['api_key_env']}" if p["api_key_env"] else "")
            + "); import with create providers to create it disabled"
            for p in self.providers_missing
        ]
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), **vars(self)}
