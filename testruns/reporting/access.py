"""Who may see which runs: the one access rule for runs, written once. Pages, the API and the
consumers look runs up through `runs_visible_to` / `get_run_for_user`, never through
`TestRun.objects` directly.

A user with `testruns.view_testrun` sees every run; anyone else signed in sees the runs they
launched; an anonymous user sees none.
"""

from __future__ import annotations

from django.db.models import QuerySet

from testruns.models import TestRun


def runs_visible_to(user) -> QuerySet[TestRun]:
    runs = TestRun.objects.select_related("card", "provider", "version", "launched_by")
    if not user.is_authenticated:
        return runs.none()
    if user.has_perm("testruns.view_testrun"):
        return runs
    return runs.filter(launched_by=user)


def get_run_for_user(user, pk) -> TestRun | None:
    """The run, or None when it does not exist, the user may not see it or `pk` is no id."""
    try:
        return runs_visible_to(user).get(pk=pk)
    except (TestRun.DoesNotExist, ValueError, TypeError):
        return None


def can_cancel(user, run: TestRun) -> bool:
    """For a run the user may see (looked up through get_run_for_user)."""
    return not run.is_finished and user.has_perm("testruns.cancel_testrun")


def visible_running_ids(user, candidates: list[int] | None = None) -> set[int]:
    """Ids of the running runs the user may see (among `candidates` when given)."""
    runs = runs_visible_to(user).filter(status=TestRun.Status.RUNNING)
    if candidates is not None:
        runs = runs.filter(pk__in=candidates)
    return set(runs.values_list("pk", flat=True))
