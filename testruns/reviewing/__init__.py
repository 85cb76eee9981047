"""People reviewing results: marking a run's results for review (its failures, a sample of
its passes, the cases with too little evidence against the baseline), the queue a reviewer
works through, and their decisions, kept beside the automatic verdicts.

May import: testruns.reporting (access, baselines, verdicts) and testruns.models. Entry
points (pages, the admin) call it; the engine never does.
"""
