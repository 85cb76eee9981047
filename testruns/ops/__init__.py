"""Running the app: /metrics and /healthz (entry points), host load for admission, and the
log context that ties log lines to a run and a case (low-level, imported by the engine).

May import: metrics and health, testruns.reporting, testruns.engine (the counters' names)
and testruns.models; host_load and
log_context, nothing of the app (the engine and the catalog import them).
"""
