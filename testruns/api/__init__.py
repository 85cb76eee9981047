"""The REST API. Thin: views translate requests and call services, selectors and stats.

Permissions are the pages': reading runs goes through `access.runs_visible_to`; launching
needs `testruns.launch_testrun` and cancelling `testruns.cancel_testrun`; cards, versions,
test cases and providers need the admin's model permissions to change, and their view
permission (or the launch permission: the launch page lists cards and providers) to read.
Errors are JSON (`{"field": ["message"]}` or `{"detail": "..."}`), never a 500 for bad input.

- `catalog`: cards, versions, test cases, providers;
- `runs`: queueing (with Idempotency-Key), progress, results, reports, cancelling;
- `operations`: queue statistics and system resources;
- `params`, `permissions`: checked query parameters and the access rules;
- `protocol`: JSON parsing, pagination and JSON errors. settings.REST_FRAMEWORK names it, and
  DRF imports it while defining its APIView, so nothing here may import views at package level.
"""
