"""What pages see while work goes on: event wire shapes (wire), publishing after commit
(publish), run and queue snapshots (snapshots), and the WebSocket consumers (consumers).

Publishing, shapes and snapshots may import only testruns.models (and libraries): snapshots
are given runs the entry point already looked up through testruns.reporting.access (a run,
or the queryset of runs a user may see). Consumers are entry points and may also import
testruns.reporting.
"""
