"""Running the app: /metrics and /healthz (entry points), host load for admission, and the
log context that ties log lines to a run and a case (low-level, imported by the engine).
"""
