"""The REST API: urls, views per resource, serializers per resource (`serializers/`),
idempotency and the JSON protocol. Thin: views translate requests and call the engine's
services and reporting's reads. May import everything below it (reporting, engine, live,
catalog, models); nothing imports it but the URL configuration.

Permissions are the pages': reading runs goes through `reporting.access.runs_visible_to`;
launching needs `testruns.launch_testrun` and cancelling `testruns.cancel_testrun`; cards, versions,
test cases and providers need the admin's model permissions to change, and their view
permission (or the launch permission: the launch page lists cards and providers) to read.
Errors are JSON (`{"field": ["message"]}` or `{"detail": "..."}`), never a 500 for bad input.

- `catalog`: cards, versions, test cases, providers;
- `runs`: queueing (with Idempotency-Key), progress, results, reports, cancelling;
- `operations`: queue statistics and system resources;
- `serializers/`: one module per resource (`catalog`, `runs`, `operations`, `shared`);
- `params`, `permissions`: checked query parameters and the access rules;
- `protocol`: JSON parsing, pagination and JSON errors. settings.REST_FRAMEWORK names it, and
  DRF imports it while defining its APIView, so nothing here may import views at package level.
"""
