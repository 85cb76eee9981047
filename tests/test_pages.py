"""The pages, rendered by Django's test client against the real database: what each shows, to
whom, with how many queries, and that untrusted output is escaped."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.db.models import F
from django.urls import reverse
from django.utils import timezone

from testruns.catalog import cards
from testruns.engine import launching, limits
from testruns.live import snapshots
from testruns.models import PromptCard, Provider, TestCase, TestResult, TestRun

pytestmark = pytest.mark.django_db

XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'


def finish(
    run: TestRun,
    statuses: list[str],
    *,
    output: str = "ok",
    latency: float = 100,
    ago: timedelta = timedelta(0),
) -> TestRun:
    """Make a launched run look executed: its results get `statuses` in position order."""
    now = timezone.now() - ago
    for result, status in zip(run.results.order_by("position"), statuses, strict=True):
        result.status = status
        result.output = f"{output} {result.position}"
        result.latency_ms = latency + result.position
        result.tokens_in, result.tokens_out, result.cost = 10, 5, Decimal("0.001")
        result.assertion_results = [
            {
                "type": "contains",
                "passed": status == "passed",
                "score": 1.0 if status == "passed" else 0.0,
                "reason": "found it" if status == "passed" else "missing",
                "weight": 1.0,
            }
        ]
        result.finished_at = now
        result.save()
    counts = {s: statuses.count(s) for s in ("passed", "failed", "error")}
    worst = "error" if counts["error"] else "failed" if counts["failed"] else "succeeded"
    TestRun.objects.filter(pk=run.pk).update(
        status=worst,
        phase="done",
        done_count=len(statuses),
        passed_count=counts["passed"],
        failed_count=counts["failed"],
        error_count=counts["error"],
        tokens_in=10 * len(statuses),
        tokens_out=5 * len(statuses),
        cost=Decimal("0.001") * len(statuses),
        queued_at=now - timedelta(seconds=30),
        started_at=now - timedelta(seconds=20),
        finished_at=now,
    )
    run.refresh_from_db()
    return run


def login_as_viewer(client, django_user_model, name="viewer"):
    viewer = django_user_model.objects.create_user(name, password=f"{name}-password-1")
    viewer.user_permissions.add(Permission.objects.get(codename="view_testrun"))
    client.force_login(viewer)
    return viewer


# --- Access --------------------------------------------------------------------------------


def test_every_page_requires_login(client, launcher, make_card, simulator):
    run = launching.launch_run(card=make_card(), provider=simulator, user=launcher)
    for url in [
        reverse("dashboard"),
        reverse("dashboard-json"),
        reverse("launch"),
        reverse("history"),
        reverse("compare"),
        run.get_absolute_url(),
        reverse("run-status", args=[run.pk]),
        reverse("report", args=[run.pk]),
        reverse("report-csv", args=[run.pk]),
    ]:
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("login"))


def test_login_page_logs_in(client, user):
    response = client.post(reverse("login"), {"username": "alice", "password": "alice-password-1"})
    assert response.status_code == 302
    assert client.get(reverse("dashboard")).status_code == 200


def test_status_json_is_private_to_those_who_may_see_the_run(
    client, launcher, django_user_model, make_card, simulator
):
    run = launching.launch_run(card=make_card(), provider=simulator, user=launcher)
    client.force_login(launcher)
    snapshot = client.get(reverse("run-status", args=[run.pk])).json()
    assert snapshot["run"]["status"] == "queued" and snapshot["run"]["queue_position"] == 1
    assert snapshot["queue"]["position"] == 1 and snapshot["queue"]["waiting"] == 1

    other = django_user_model.objects.create_user("bob", password="bob-password-1")
    client.force_login(other)
    for name in [
        "run-detail",
        "run-status",
        "run-results",
        "report",
        "report-csv",
        "report-json",
        "report-junit",
    ]:
        assert client.get(reverse(name, args=[run.pk])).status_code == 404, name
    assert client.post(reverse("run-cancel", args=[run.pk])).status_code == 404


# --- Launch --------------------------------------------------------------------------------


def test_launch_page_queues_a_run_and_leads_to_its_page(client, launcher, make_card, simulator):
    card = make_card(cases=2)
    client.force_login(launcher)
    page = client.get(reverse("launch"), {"card": card.pk})
    assert page.status_code == 200 and "case 1" in page.content.decode()
    response = client.post(
        reverse("launch"),
        {
            "card": card.pk,
            "providers": [simulator.pk],
            "selection": "all",
            "priority": 5,
            "max_concurrent_tests": 3,
            "timeout_seconds": 20,
            "max_retries": 1,
            "repeats": 2,
            "stop_on_failure": "on",
            "use_cache": "on",
        },
    )
    run = TestRun.objects.get()
    assert response.status_code == 302 and response["Location"] == run.get_absolute_url()
    assert (run.status, run.priority, run.total_cases, run.launched_by) == (
        "queued",
        5,
        2,
        launcher,
    )
    assert (
        run.max_concurrent_tests,
        run.timeout_seconds,
        run.max_retries,
        run.repeats,
        run.stop_on_failure,
        run.use_cache,
    ) == (3, 20, 1, 2, True, True)
    assert run.comparison_group is None
    page = client.get(run.get_absolute_url())
    assert page.status_code == 200 and f"/ws/runs/{run.pk}/" in page.content.decode()


def launch_form(card, providers, **fields) -> dict:
    return {
        "card": card.pk,
        "providers": [p.pk for p in providers],
        "selection": "all",
        "priority": 0,
        "max_concurrent_tests": 4,
        "timeout_seconds": 60,
        "max_retries": 2,
        "repeats": 1,
        **fields,
    }


def test_launch_on_several_providers_makes_one_run_each_as_a_comparison(
    client, launcher, make_card, simulator
):
    other = Provider.objects.create(name="Second sim", kind="simulator", parameters={})
    card = make_card(cases=2)
    client.force_login(launcher)
    response = client.post(reverse("launch"), launch_form(card, [simulator, other]))
    runs = list(TestRun.objects.order_by("provider__name"))
    assert len(runs) == 2 and {r.provider for r in runs} == {simulator, other}
    group = runs[0].comparison_group
    assert group is not None and runs[1].comparison_group == group
    assert response["Location"] == reverse("comparison", args=[group])
    page = client.get(response["Location"]).content.decode()
    assert all(f"/runs/{run.pk}/" in page for run in runs)


def test_launch_by_tag_runs_only_tagged_cases_of_an_older_version(
    client, launcher, make_card, simulator
):
    card = make_card(cases=4)
    TestCase.objects.filter(card=card, name__in=["case 1", "case 3"]).update(tags=["smoke"])
    TestCase.objects.filter(card=card, name="case 2").update(tags=["slow"])
    old = card.versions.get()
    card.template = "Greet {{ name }} warmly."
    card.save()
    cards.snapshot_version(card)
    client.force_login(launcher)
    client.post(
        reverse("launch"),
        launch_form(card, [simulator], selection="tag", tags=["smoke"], version=old.pk),
    )
    run = TestRun.objects.get()
    assert run.version == old
    assert list(run.results.values_list("case_name", flat=True)) == ["case 1", "case 3"]


def test_launch_with_picked_cases_runs_just_those(client, launcher, make_card, simulator):
    card = make_card(cases=3)
    picked = card.cases.get(name="case 2")
    client.force_login(launcher)
    client.post(
        reverse("launch"), launch_form(card, [simulator], selection="picked", cases=[picked.pk])
    )
    assert list(TestRun.objects.get().results.values_list("case", flat=True)) == [picked.pk]


def test_launch_refuses_cases_and_versions_of_another_card(client, launcher, make_card, simulator):
    card, other = make_card("one"), make_card("two")
    client.force_login(launcher)
    response = client.post(
        reverse("launch"),
        launch_form(
            card,
            [simulator],
            selection="picked",
            cases=[other.cases.first().pk],
            version=other.versions.get().pk,
        ),
    )
    assert response.status_code == 200
    assert not TestRun.objects.exists()
    form = response.context["form"]
    assert "cases" in form.errors and "version" in form.errors


def test_launch_without_permission_is_forbidden_and_hidden(client, user, make_card, simulator):
    client.force_login(user)
    assert client.get(reverse("launch")).status_code == 403
    assert reverse("launch") not in client.get(reverse("dashboard")).content.decode()


def test_launch_of_a_card_without_cases_explains_why(client, launcher, make_card, simulator):
    card = make_card(cases=0)
    client.force_login(launcher)
    response = client.post(reverse("launch"), launch_form(card, [simulator]))
    assert response.status_code == 200
    assert "has no enabled test cases" in response.content.decode()
    assert not TestRun.objects.exists()


# --- Dashboard and live run page ------------------------------------------------------------


def test_dashboard_lists_slots_running_waiting_and_recent_without_others_details(
    client, launcher, django_user_model, make_card, simulator
):
    limits.ensure_semaphores(simulator)
    card = make_card()
    mine = launching.launch_run(card=card, provider=simulator, user=launcher, priority=1)
    stranger = django_user_model.objects.create_user("stranger", password="pw-stranger-1")
    secret = make_card("secret-card", name="Secret card")
    theirs = launching.launch_run(card=secret, provider=simulator, user=stranger, priority=5)
    done = finish(
        launching.launch_run(card=card, provider=simulator, user=launcher), ["passed"] * 3
    )
    client.force_login(launcher)
    state = client.get(reverse("dashboard-json")).json()
    assert [(e["id"], e["position"], e["priority"]) for e in state["waiting"]] == [
        (theirs.pk, 1, 5),
        (mine.pk, 2, 1),
    ]
    assert state["waiting"][0]["run"] is None  # another user's run: position only
    assert state["waiting"][1]["run"]["card"] == "Greeting"
    assert [r["id"] for r in state["recent"]] == [done.pk]
    assert state["slots"][0]["name"] == "runs"
    assert {s["label"] for s in state["slots"]} >= {"Runs", simulator.name}
    page = client.get(reverse("dashboard")).content.decode()
    assert "Secret card" not in page and "stranger" not in page
    assert "another user's run" in page and 'data-ws-path="/ws/dashboard/"' in page


def test_run_snapshot_holds_the_latest_rows_and_the_rest_is_paged(
    client, launcher, make_card, simulator
):
    card = make_card(cases=snapshots.LIVE_ROWS + 30)
    run = finish(
        launching.launch_run(card=card, provider=simulator, user=launcher),
        ["passed"] * (snapshots.LIVE_ROWS + 30),
    )
    client.force_login(launcher)
    snapshot = client.get(reverse("run-status", args=[run.pk])).json()
    positions = [r["position"] for r in snapshot["results"]]
    assert positions == list(range(30, snapshots.LIVE_ROWS + 30))
    first = snapshot["results"][0]
    assert first["assertion_results"][0]["reason"] == "found it"
    assert (first["tokens_in"], first["tokens_out"], first["cost"]) == (10, 5, 0.001)
    page = client.get(reverse("run-results", args=[run.pk]), {"page": 3}).json()
    assert (page["total"], page["pages"]) == (snapshots.LIVE_ROWS + 30, 3)
    assert [r["position"] for r in page["results"]] == list(range(100, 130))
    failed = client.get(reverse("run-results", args=[run.pk]), {"status": "failed"}).json()
    assert failed["total"] == 0


def test_cancel_needs_the_permission_and_keeps_finished_results(
    client, launcher, django_user_model, make_card, simulator
):
    run = launching.launch_run(card=make_card(), provider=simulator, user=launcher)
    viewer = login_as_viewer(client, django_user_model)
    page = client.get(run.get_absolute_url()).content.decode()
    assert "Cancel run" not in page
    assert client.post(reverse("run-cancel", args=[run.pk])).status_code == 403

    client.force_login(launcher)
    assert "Cancel run" in client.get(run.get_absolute_url()).content.decode()
    response = client.post(
        reverse("run-cancel", args=[run.pk]), headers={"Accept": "application/json"}
    )
    assert response.json() == {"cancelled": True}
    run.refresh_from_db()
    assert run.status == "cancelled" and viewer.pk != launcher.pk
    assert "Cancel run" not in client.get(run.get_absolute_url()).content.decode()


# --- History -------------------------------------------------------------------------------


def test_history_filters_by_card_provider_status_launcher_and_date(
    client, launcher, django_user_model, make_card, simulator
):
    greeting, other_card = make_card(), make_card("other")
    other_provider = Provider.objects.create(name="Other sim", kind="simulator", parameters={})
    a = finish(
        launching.launch_run(card=greeting, provider=simulator, user=launcher), ["passed"] * 3
    )
    b = finish(
        launching.launch_run(card=greeting, provider=other_provider, user=launcher),
        ["passed", "failed", "passed"],
        ago=timedelta(days=3),
    )
    c = launching.launch_run(card=other_card, provider=simulator, user=launcher)
    viewer = login_as_viewer(client, django_user_model)
    d = finish(launching.launch_run(card=greeting, provider=simulator, user=viewer), ["passed"] * 3)

    def shown(**params) -> list[int]:
        response = client.get(reverse("history"), params)
        assert response.status_code == 200
        return [run.pk for run in response.context["page"]]

    assert sorted(shown()) == sorted([a.pk, b.pk, c.pk, d.pk])
    assert sorted(shown(card=greeting.pk)) == sorted([a.pk, b.pk, d.pk])
    assert shown(provider=other_provider.pk) == [b.pk]
    assert shown(status="failed") == [b.pk]
    assert shown(status="queued") == [c.pk]
    assert sorted(shown(launcher=viewer.pk)) == [d.pk]
    since = (timezone.now() - timedelta(days=1)).date().isoformat()
    assert b.pk not in shown(since=since)
    until = (timezone.now() - timedelta(days=2)).date().isoformat()
    assert shown(until=until) == [b.pk]

    client.force_login(launcher)  # without view_testrun: only their own runs
    assert d.pk not in shown()


def test_history_paginates_by_25_and_draws_pass_rate_and_p95_per_card(
    client, launcher, make_card, simulator, django_assert_max_num_queries
):
    card = make_card(cases=2)
    for i in range(30):
        statuses = ["passed", "passed"] if i % 2 else ["passed", "failed"]
        finish(
            launching.launch_run(card=card, provider=simulator, user=launcher),
            statuses,
            latency=100 + i,
            ago=timedelta(minutes=30 - i),
        )
    client.force_login(launcher)
    with django_assert_max_num_queries(15):
        response = client.get(reverse("history"))
    assert len(response.context["page"]) == 25
    assert response.context["page"].paginator.num_pages == 2
    chart = response.context["charts"][0]
    assert chart["card"] == "Greeting" and len(chart["chart"]["dots"]) == 30
    rates = [dot["pass_rate"] for dot in chart["chart"]["dots"]]
    assert rates[:2] == [0.5, 1.0]
    assert chart["chart"]["dots"][-1]["p95"] == pytest.approx(129 + 0.95)
    html = response.content.decode()
    assert "<svg" in html and "polyline" in html
    page2 = client.get(reverse("history"), {"page": 2})
    assert len(page2.context["page"]) == 5


# --- Reports -------------------------------------------------------------------------------


def test_report_shows_statistics_and_regressions_against_the_previous_run(
    client, launcher, make_card, simulator
):
    card = make_card(cases=4)
    before = finish(
        launching.launch_run(card=card, provider=simulator, user=launcher),
        ["passed", "failed", "passed", "passed"],
        ago=timedelta(minutes=5),
    )
    after = finish(
        launching.launch_run(card=card, provider=simulator, user=launcher),
        ["passed", "passed", "failed", "error"],
    )
    client.force_login(launcher)
    response = client.get(reverse("report", args=[after.pk]))
    assert response.context["baseline"] == before
    stats = response.context["stats"]
    assert (stats["passed"], stats["evaluated"]) == (2, 4) and stats["pass_rate"] == 0.5
    assert stats["p50_ms"] == pytest.approx(101.5) and stats["tokens_in"] == 40
    assert stats["cost_per_pass"] == Decimal("0.002")
    assert stats["queue_wait_seconds"] == pytest.approx(10, abs=0.1)
    changes = response.context["changes"]
    assert [c.case_name for c in changes["regressions"]] == ["case 2", "case 3"]
    assert [c.case_name for c in changes["fixes"]] == ["case 1"]
    html = response.content.decode()
    assert "2 regressions" in html and "1 fix" in html
    assert 'class="regression"' in html and "missing" in html  # assertion reasons


def test_a_pinned_baseline_wins_over_the_previous_run(
    client, django_user_model, launcher, make_card, simulator
):
    card = make_card(cases=2)
    pinned = finish(
        launching.launch_run(card=card, provider=simulator, user=launcher),
        ["passed", "passed"],
        ago=timedelta(minutes=9),
    )
    finish(
        launching.launch_run(card=card, provider=simulator, user=launcher),
        ["failed", "failed"],
        ago=timedelta(minutes=5),
    )
    latest = finish(
        launching.launch_run(card=card, provider=simulator, user=launcher), ["passed", "failed"]
    )
    editor = login_as_viewer(client, django_user_model, "editor")
    editor.user_permissions.add(Permission.objects.get(codename="change_promptcard"))
    client.post(reverse("pin-baseline", args=[pinned.pk]))
    assert PromptCard.objects.get(pk=card.pk).baseline_run == pinned
    response = client.get(reverse("report", args=[latest.pk]))
    assert response.context["baseline"] == pinned
    assert [c.case_name for c in response.context["changes"]["regressions"]] == ["case 1"]


def test_report_pages_its_case_table_and_filters_by_status(client, launcher, make_card, simulator):
    card = make_card(cases=60)
    run = finish(
        launching.launch_run(card=card, provider=simulator, user=launcher),
        ["passed"] * 55 + ["failed"] * 5,
    )
    client.force_login(launcher)
    assert len(client.get(reverse("report", args=[run.pk])).context["rows"]) == 50
    failed = client.get(reverse("report", args=[run.pk]), {"status": "failed"})
    assert [row.result.position for row in failed.context["rows"]] == list(range(55, 60))


def test_side_by_side_shows_runs_as_columns_and_can_show_differences_only(
    client, launcher, make_card, simulator
):
    card = make_card(cases=3)
    one = finish(
        launching.launch_run(card=card, provider=simulator, user=launcher),
        ["passed", "passed", "failed"],
    )
    two = finish(
        launching.launch_run(card=card, provider=simulator, user=launcher),
        ["passed", "failed", "failed"],
    )
    client.force_login(launcher)
    url = reverse("compare")
    every = client.get(url, {"runs": f"{one.pk},{two.pk}"})
    assert [row["case_name"] for row in every.context["page"]] == ["case 0", "case 1", "case 2"]
    assert [[cell.status for cell in row["cells"]] for row in every.context["page"]][1] == [
        "passed",
        "failed",
    ]
    diff = client.get(url, {"runs": f"{one.pk},{two.pk}", "diff": "1"})
    assert [row["case_name"] for row in diff.context["page"]] == ["case 1"]


def test_model_output_is_escaped_on_server_rendered_pages(client, launcher, make_card, simulator):
    card = make_card(cases=1)
    run = finish(
        launching.launch_run(card=card, provider=simulator, user=launcher), ["failed"], output=XSS
    )
    TestResult.objects.filter(run=run).update(case_name=F("output"))
    client.force_login(launcher)
    for url in [reverse("report", args=[run.pk]), reverse("compare") + f"?runs={run.pk}"]:
        html = client.get(url).content.decode()
        assert "<script>window.__xss" not in html and "<img src=x" not in html, url
        assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in html, url
