"""Running work under the gate: launch and cancel (launching), limits, admission, the gate
itself (SQL only: it takes and returns ids), dispatch of messages, execution of a case,
provider calls, in-flight tracking, the sweeper and the worker process (leases, heartbeat),
schedules (scheduling: due times launched once, from the workers), and settling finished runs
(settling: the /metrics counters, and the deliveries of their notifications).

Flow: launching -> admission -> gate -> dispatch (message) -> actors -> execution ->
providers -> catalog.assertions -> result -> live.publish (event).
May import: testruns.catalog, testruns.live (publish, wire, snapshots), testruns.ops
(log_context, host_load), testruns.models.
"""
