"""Reading what ran: which runs a user may see, history and trends, statistics (one pass-rate
definition), baselines and regressions, what changed in a run (run_changes: the one rule that
notifications use), comparison, and export formats (JSON, JUnit, CSV).

May import: testruns.engine (names and read helpers), testruns.live (snapshots),
testruns.catalog, testruns.models. Never writes run state, except a finished run's stored
aggregates, once, when a report finds them missing (engine.run_aggregates).
"""
