"""The admin, where users keep cards, cases and providers. Declarative where it can be; the
few custom steps call services, so the admin does what the pages and the API do.

One module per family of models: `cards` (cards and their cases, import and export),
`case_editor` (the cases' inline and its editor), `versions` (their history), `providers`,
`runs` (runs and their results; launching from the cards' list), `semaphores` (the gate's
limits) and `schedules` (schedules, notification rules, the launch and delivery logs).
Django's autodiscover imports this package, and importing the modules here registers their
ModelAdmins.

May import: testruns.engine and testruns.catalog (services), testruns.reporting,
testruns.models. Nothing imports the admin.
"""

from __future__ import annotations

from testruns.admin import cards, providers, runs, schedules, semaphores, versions  # noqa: F401
