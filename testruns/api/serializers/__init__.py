"""Translating API input and output, one module per resource: `catalog` (cards, versions,
test cases, providers), `runs` (launching, runs, progress, results) and `operations` (queue
statistics, system resources), over `shared` (model validation as DRF errors, limits, and
fields that take a card or a provider by name or id).

Validation of stored objects is the models' own (`full_clean()`), so the API rejects exactly
what the admin and imports reject, with the same message on the same field; the bounds of a
run's settings are TestRun's fields' validators, as on the launch page and in the CLI.
Nothing is re-exported here: import from the module that holds it.
"""
