"""Schedules: due times by the database clock, launched through the one launch service exactly
once however many worker processes tick, once (not once per tick) after an outage, nothing
while paused; managed in the admin, the API and a page; a card's history shows its next run.
Against the real database, Redis and worker processes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import Permission
from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models.functions import Now
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from testruns.catalog import cron
from testruns.engine import scheduling
from testruns.models import Provider, Schedule, ScheduleLaunch, TestRun
from tests.conftest import wait_for

db = pytest.mark.django_db

EVERY_4_SECONDS = "*/4 * * * * *"
# Due times the three processes launch in the first part of the test: about a minute.
LAUNCHES = 14


@pytest.fixture
def schedule_for(launcher, simulator):
    def make(card=None, *, cron_expression: str = "0 6 * * *", **fields) -> Schedule:
        schedule = Schedule(
            name=fields.pop("name", "nightly"),
            card=card,
            owner=fields.pop("owner", launcher),
            cron=cron_expression,
            **fields,
        )
        schedule.full_clean()
        return scheduling.save_schedule(schedule, providers=[simulator])

    return make


def make_due(schedule: Schedule, *, seconds_ago: float) -> None:
    """As if its next due time had passed `seconds_ago` ago (by the database clock)."""
    Schedule.objects.filter(pk=schedule.pk).update(
        next_due_at=Now() - timedelta(seconds=seconds_ago)
    )


# --- Cron and validation --------------------------------------------------------------------


def test_cron_fields_are_read_in_the_schedules_time_zone():
    winter = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
    summer = datetime(2026, 7, 15, 12, 0, tzinfo=UTC)
    # 09:00 in Paris is 08:00 UTC in winter and 07:00 UTC in summer.
    assert cron.next_after("0 9 * * *", "Europe/Paris", winter).hour == 8
    assert cron.next_after("0 9 * * *", "Europe/Paris", summer).hour == 7
    # Six fields: seconds first.
    start = datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert cron.next_after(EVERY_4_SECONDS, "UTC", start).second == 4
    assert cron.latest_at_or_before(EVERY_4_SECONDS, "UTC", start.replace(second=8)).second == 8


@db
def test_a_schedule_needs_a_valid_cron_a_time_zone_and_a_card_or_a_tag(launcher, make_card):
    card = make_card()
    with pytest.raises(ValidationError) as caught:
        Schedule(name="x", cron="61 * * * *", time_zone="Mars/Olympus", owner=launcher).full_clean()
    errors = caught.value.message_dict
    assert "out of range" in errors["cron"][0]
    assert "not an IANA time zone" in errors["time_zone"][0]
    assert errors["card"] == ["Choose a card or a tag of cards (one of them)."]
    with pytest.raises(ValidationError, match="one of them"):
        Schedule(name="x", cron="@daily", card=card, card_tag="nightly").full_clean()
    with pytest.raises(ValidationError) as caught:
        Schedule(name="x", cron="@daily", card=card, repeats=21, priority=-101).full_clean()
    assert set(caught.value.message_dict) == {"repeats", "priority"}  # TestRun's own bounds


# --- Launching due times (in this process) ---------------------------------------------------


@db
def test_a_due_schedule_launches_once_through_the_launch_service(schedule_for, make_card):
    schedule = schedule_for(make_card(cases=2), repeats=2, priority=5)
    assert schedule.next_due_at is not None
    assert scheduling.launch_next_due() is None  # 06:00 is not due yet
    make_due(schedule, seconds_ago=1)

    launch = scheduling.launch_next_due()
    assert launch is not None and (launch.run_count, launch.missed, launch.error) == (1, 0, "")
    (run,) = TestRun.objects.filter(schedule_launch=launch)
    assert (run.launched_by, run.repeats, run.priority, run.total_cases) == (
        schedule.owner,
        2,
        5,
        2,
    )
    assert scheduling.launch_next_due() is None  # the same due time never again
    schedule.refresh_from_db()
    assert schedule.next_due_at > launch.launched_at  # planned after now


@db
def test_missed_due_times_are_covered_by_one_launch(schedule_for, make_card):
    every_10s = "*/10 * * * * *"
    schedule = schedule_for(make_card(), cron_expression=every_10s)
    # Four or five due times passed while nothing ticked.
    first = cron.latest_at_or_before(every_10s, "UTC", database_now() - timedelta(seconds=30))
    Schedule.objects.filter(pk=schedule.pk).update(next_due_at=first)

    launch = scheduling.launch_next_due()
    assert scheduling.launch_next_due() is None
    assert ScheduleLaunch.objects.count() == 1 and TestRun.objects.count() == 1
    # One launch, for the latest due time, covering the earlier ones.
    assert launch.due_at == cron.latest_at_or_before(every_10s, "UTC", launch.launched_at)
    assert launch.missed == cron.due_times_between(every_10s, "UTC", first, launch.due_at) - 1
    assert launch.missed >= 3


@db
def test_a_paused_schedule_launches_nothing_and_resuming_starts_from_now(schedule_for, make_card):
    schedule = schedule_for(make_card(), paused=True)
    assert schedule.next_due_at is None
    assert scheduling.launch_due_schedules() == 0
    Schedule.objects.filter(pk=schedule.pk).update(next_due_at=Now() - timedelta(hours=5))
    assert scheduling.launch_due_schedules() == 0  # paused, whatever its due time says
    scheduling.set_paused(schedule, False)
    assert schedule.next_due_at is not None and scheduling.launch_due_schedules() == 0
    assert not ScheduleLaunch.objects.exists()


@db
def test_a_tag_schedule_launches_every_tagged_card_on_every_provider(
    schedule_for, make_card, simulator
):
    other = Provider.objects.create(name="Second", kind="simulator", model="sim-2")
    tagged = [make_card("a", tags=["nightly"]), make_card("b", tags=["nightly", "x"])]
    make_card("c", tags=["x"])
    make_card("d", tags=["nightly"], cases=0)  # nothing to run: left out
    schedule = schedule_for(card_tag="nightly")
    schedule.providers.add(other)
    make_due(schedule, seconds_ago=1)

    launch = scheduling.launch_next_due()
    runs = TestRun.objects.filter(schedule_launch=launch)
    assert {(run.card_id, run.provider_id) for run in runs} == {
        (card.pk, provider.pk) for card in tagged for provider in (simulator, other)
    }
    assert len({run.comparison_group for run in runs}) == 1  # one comparison group


@db
def test_a_refused_launch_is_recorded_and_the_schedule_moves_on(
    schedule_for, make_card, django_user_model, simulator
):
    nobody = django_user_model.objects.create_user("nobody", password="nobody-password-1")
    schedule = schedule_for(make_card(), owner=nobody)
    make_due(schedule, seconds_ago=1)
    launch = scheduling.launch_next_due()
    assert launch.run_count == 0 and "may not launch runs" in launch.error
    assert not TestRun.objects.exists()
    assert scheduling.launch_next_due() is None  # not retried every tick

    nobody.user_permissions.add(Permission.objects.get(codename="launch_testrun"))
    simulator.enabled = False
    simulator.save()
    make_due(schedule, seconds_ago=1)
    launch = scheduling.launch_next_due()
    assert launch.run_count == 0 and "is disabled" in launch.error


@db
def test_a_schedule_whose_launch_breaks_does_not_hold_up_the_others(
    schedule_for, make_card, monkeypatch
):
    broken = schedule_for(make_card("broken"), name="broken")
    fine = schedule_for(make_card("fine"), name="fine")
    make_due(broken, seconds_ago=2)  # the most overdue: taken first
    make_due(fine, seconds_ago=1)
    real_launch = scheduling.launching.launch_runs

    def launch_runs(**kwargs):
        if kwargs["cards"][0].slug == "broken":
            raise RuntimeError("a bug nobody foresaw")
        return real_launch(**kwargs)

    monkeypatch.setattr(scheduling.launching, "launch_runs", launch_runs)

    assert scheduling.launch_due_schedules() == 2
    failed = ScheduleLaunch.objects.get(schedule=broken)
    assert failed.run_count == 0
    assert failed.error == "unexpected error: RuntimeError: a bug nobody foresaw"
    assert ScheduleLaunch.objects.get(schedule=fine).run_count == 1
    broken.refresh_from_db()
    assert broken.next_due_at > database_now()  # it moved on: not retried every tick


# --- Across worker processes ------------------------------------------------------------------


def consecutive(expression: str, due_times: list) -> bool:
    return all(
        cron.next_after(expression, "UTC", earlier) == later
        for earlier, later in zip(due_times, due_times[1:], strict=False)
    )


@pytest.mark.django_db(transaction=True)
def test_three_worker_processes_launch_each_due_time_once_and_catch_up_once(
    worker_factory, schedule_for, make_card
):
    card = make_card(cases=1)
    paused = schedule_for(card, name="paused", cron_expression=EVERY_4_SECONDS, paused=True)
    fast = {"SCHEDULE_INTERVAL_SECONDS": "0.5"}
    workers = worker_factory(processes=3, threads=2, env=fast)
    # Planned once the workers are up, so that their boot is not an outage to catch up on.
    schedule = schedule_for(card, cron_expression=EVERY_4_SECONDS)
    wait_for(
        lambda: ScheduleLaunch.objects.filter(schedule=schedule).count() >= LAUNCHES,
        timeout=LAUNCHES * 4 + 40,
        what=f"{LAUNCHES} due times to be launched (about a minute)",
    )
    workers.stop()
    before = list(ScheduleLaunch.objects.filter(schedule=schedule).order_by("due_at"))
    due_times = [launch.due_at for launch in before]
    assert consecutive(EVERY_4_SECONDS, due_times), due_times  # none skipped, none twice
    assert [(launch.missed, launch.run_count) for launch in before] == [(0, 1)] * len(before)
    assert TestRun.objects.filter(schedule_launch__schedule=schedule).count() == len(before)

    # All workers are down across two due times (by the database clock).
    schedule.refresh_from_db()
    first_missed = schedule.next_due_at
    second_missed = cron.next_after(EVERY_4_SECONDS, "UTC", first_missed)
    wait_for(
        lambda: database_now() > second_missed + timedelta(milliseconds=200),
        timeout=20,
        what="two due times to pass",
    )
    worker_factory(processes=3, threads=2, env=fast)
    wait_for(
        lambda: ScheduleLaunch.objects.filter(schedule=schedule).count() >= len(before) + 2,
        timeout=60,
        what="the catch-up launch and the next one",
    )
    after = list(ScheduleLaunch.objects.filter(schedule=schedule, due_at__gt=due_times[-1]))
    after.sort(key=lambda launch: launch.due_at)
    catch_up, *rest = after
    assert catch_up.missed >= 1 and catch_up.due_at >= second_missed  # one launch for both
    assert not ScheduleLaunch.objects.filter(
        schedule=schedule, due_at__gt=due_times[-1], due_at__lt=catch_up.due_at
    ).exists()
    assert consecutive(EVERY_4_SECONDS, [launch.due_at for launch in after])
    assert all(launch.missed == 0 for launch in rest)
    assert not ScheduleLaunch.objects.filter(schedule=paused).exists()
    assert not TestRun.objects.filter(schedule_launch__schedule=paused).exists()


def database_now() -> datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        return cursor.fetchone()[0]


# --- Managed in the API, the page and the admin -----------------------------------------------


@pytest.fixture
def scheduler(launcher):
    launcher.user_permissions.add(
        *Permission.objects.filter(
            codename__in=["add_schedule", "change_schedule", "delete_schedule", "view_schedule"]
        )
    )
    return launcher


def api_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


@db
def test_the_api_creates_pauses_and_lists_schedules_with_the_launch_bounds(
    scheduler, make_card, simulator
):
    make_card("support-reply")
    api = api_for(scheduler)
    body = {
        "name": "nightly",
        "card": "support-reply",
        "providers": [simulator.name],
        "cron": "0 6 * * 1-5",
        "time_zone": "Europe/Paris",
        "repeats": 3,
    }
    created = api.post("/api/schedules/", body, format="json")
    assert created.status_code == 201, created.json()
    data = created.json()
    assert (data["owner"], data["repeats"], data["providers"]) == ("alice", 3, [simulator.pk])
    assert data["next_due_at"] is not None and data["url"] == f"/schedules/{data['id']}/"

    refused = api.post("/api/schedules/", body | {"repeats": 21}, format="json").json()
    assert refused == {"repeats": ["Ensure this value is less than or equal to 20."]}
    refused = api.post("/api/schedules/", body | {"cron": "every day"}, format="json").json()
    assert "five fields" in refused["cron"][0]

    paused = api.patch(f"/api/schedules/{data['id']}/", {"paused": True}, format="json")
    assert paused.status_code == 200 and paused.json()["next_due_at"] is None
    assert [s["name"] for s in api.get("/api/schedules/").json()["results"]] == ["nightly"]
    assert api.get(f"/api/schedules/{data['id']}/launches/").json()["results"] == []


@db
def test_the_api_refuses_schedules_to_users_who_may_not_launch(
    django_user_model, make_card, simulator
):
    user = django_user_model.objects.create_user("bob", password="bob-password-1")
    user.user_permissions.add(Permission.objects.get(codename="add_schedule"))
    make_card("support-reply")
    answer = api_for(user).post(
        "/api/schedules/",
        {"name": "x", "card": "support-reply", "providers": [simulator.name], "cron": "@daily"},
        format="json",
    )
    assert answer.status_code == 400
    assert "may not launch runs" in str(answer.json())


@db
def test_the_page_adds_and_pauses_a_schedule_and_the_cards_history_shows_its_next_run(
    client, scheduler, make_card, simulator
):
    card = make_card()
    client.force_login(scheduler)
    history = client.get(f"/history/?card={card.pk}").content.decode()
    assert "No scheduled run" in history and f"/schedules/new/?card={card.pk}" in history

    form = client.get(f"/schedules/new/?card={card.pk}").content.decode()
    assert 'name="repeats"' in form and 'max="20"' in form
    saved = client.post(
        "/schedules/new/",
        {
            "name": "hourly check",
            "card": card.pk,
            "card_tag": "",
            "providers": [simulator.pk],
            "cron": "@hourly",
            "time_zone": "UTC",
            "priority": 0,
            "max_concurrent_tests": 4,
            "timeout_seconds": 60,
            "max_retries": 2,
            "repeats": 1,
        },
    )
    assert saved.status_code == 302, saved.content.decode()[:2000]
    schedule = Schedule.objects.get(name="hourly check")
    assert schedule.owner == scheduler and schedule.next_due_at.minute == 0

    page = client.get("/schedules/").content.decode()
    assert "hourly check" in page and "@hourly" in page
    history = client.get(f"/history/?card={card.pk}").content.decode()
    assert "Next scheduled run:" in history and "hourly check" in history

    client.post(f"/schedules/{schedule.pk}/pause/", {"paused": "1"})
    schedule.refresh_from_db()
    assert schedule.paused and schedule.next_due_at is None
    assert "No scheduled run" in client.get(f"/history/?card={card.pk}").content.decode()


@db
def test_the_admin_saves_schedules_through_the_service_and_shows_launches_read_only(
    admin_client, make_card, simulator, admin_user
):
    card = make_card()
    answer = admin_client.post(
        "/admin/testruns/schedule/add/",
        {
            "name": "weekly",
            "card": card.pk,
            "card_tag": "",
            "providers": [simulator.pk],
            "owner": admin_user.pk,
            "cron": "0 7 * * 1",
            "time_zone": "UTC",
            "priority": 0,
            "max_concurrent_tests": 4,
            "timeout_seconds": 60,
            "max_retries": 2,
            "repeats": 1,
            "notifications-TOTAL_FORMS": 0,
            "notifications-INITIAL_FORMS": 0,
        },
    )
    assert answer.status_code == 302, answer.content.decode()[:3000]
    schedule = Schedule.objects.get(name="weekly")
    assert schedule.next_due_at.weekday() == 0 and list(schedule.providers.all()) == [simulator]
    make_due(schedule, seconds_ago=1)
    scheduling.launch_next_due()
    launches = admin_client.get("/admin/testruns/schedulelaunch/").content.decode()
    assert "weekly" in launches
    assert admin_client.get("/admin/testruns/schedulelaunch/add/").status_code == 403


@db
def test_in_the_admin_only_a_superuser_picks_whose_schedule_it_is(
    client, scheduler, make_card, simulator, django_user_model
):
    scheduler.is_staff = True
    scheduler.save()
    boss = django_user_model.objects.create_superuser("boss", password="boss-password-1")
    client.force_login(scheduler)
    answer = client.post(
        "/admin/testruns/schedule/add/",
        {
            "name": "mine", "card": make_card().pk, "card_tag": "", "providers": [simulator.pk],
            "owner": boss.pk, "cron": "0 7 * * 1", "time_zone": "UTC", "priority": 0,
            "max_concurrent_tests": 4, "timeout_seconds": 60, "max_retries": 2, "repeats": 1,
            "notifications-TOTAL_FORMS": 0, "notifications-INITIAL_FORMS": 0,
        },
    )  # fmt: skip
    assert answer.status_code == 302, answer.content.decode()[:3000]
    # Its runs launch as the one who made it, not as the superuser it named.
    assert Schedule.objects.get(name="mine").owner == scheduler
