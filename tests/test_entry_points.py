"""Every entry point (the launch page, the admin's launch action, the API, the CLI) calls the
same services with the same rules: the same input makes the same runs, an out-of-bounds
setting is refused everywhere in the model's words, and a baseline is pinned by one rule."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from testruns.catalog.cards import snapshot_version
from testruns.engine import launching
from testruns.models import PromptCard, Provider, Semaphore, TestCase, TestRun
from tests.test_admin import card_form

pytestmark = pytest.mark.django_db

SETTINGS = {
    "priority": 5,
    "max_concurrent_tests": 3,
    "timeout_seconds": 20,
    "max_retries": 1,
    "repeats": 2,
    "stop_on_failure": True,
    "use_cache": True,
}
DEFAULTS = {
    "priority": 0,
    "max_concurrent_tests": 4,
    "timeout_seconds": 60,
    "max_retries": 2,
    "repeats": 1,
}
CLI_FLAGS = {
    "priority": "--priority",
    "max_concurrent_tests": "--max-concurrent",
    "timeout_seconds": "--case-timeout",
    "max_retries": "--max-retries",
    "repeats": "--repeats",
}


@pytest.fixture
def root(django_user_model):
    return django_user_model.objects.create_superuser("root", password="root-password-1")


@pytest.fixture
def web(client, root):
    client.force_login(root)
    return client


@pytest.fixture
def api(root) -> APIClient:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=root).key}")
    return api


@pytest.fixture
def providers(simulator) -> list[Provider]:
    return [simulator, Provider.objects.create(name="Second sim", kind="simulator", model="s2")]


@pytest.fixture
def card(make_card) -> PromptCard:
    """Four cases (two tagged "smoke", one disabled) and two versions."""
    card = make_card("greeting", cases=4)
    TestCase.objects.filter(card=card, name__in=["case 1", "case 3"]).update(tags=["smoke"])
    TestCase.objects.filter(card=card, name="case 2").update(enabled=False)
    card.template = "Greet {{ name }} warmly."
    card.save()
    snapshot_version(card)
    return card


# --- The entry points, each given the same launch ----------------------------------------


def launch_from_page(web, card, providers, *, version=None, case_ids=None, tags=None, **config):
    selection = "picked" if case_ids else "tag" if tags else "all"
    data = {
        "card": card.pk,
        "providers": [p.pk for p in providers],
        "selection": selection,
        "cases": case_ids or [],
        "tags": tags or [],
        "version": card.versions.get(number=version).pk if version else "",
        "grader_provider": "",
    }
    config = DEFAULTS | config  # the page's form sends every field
    data |= {k: ("on" if v is True else v) for k, v in config.items() if v is not False}
    return web.post(reverse("launch"), data)


def launch_from_admin(web, cards, providers, *, tags=None, **config):
    data = {
        "action": "launch_runs",
        "_selected_action": [c.pk for c in cards],
        "launch": "1",
        "providers": [p.pk for p in providers],
        "tags": ",".join(tags or []),
    }
    data |= {k: ("on" if v is True else v) for k, v in config.items() if v is not False}
    return web.post(reverse("admin:testruns_promptcard_changelist"), data)


def launch_from_api(api, card, providers, *, version=None, case_ids=None, tags=None, **config):
    body = {"version": version, **config}
    if case_ids:
        body["test_cases"] = case_ids
    if tags:
        body["tags"] = tags
    if len(providers) == 1:
        body |= {"card": card.pk, "provider": providers[0].pk}
        return api.post("/api/runs/", body, format="json")
    body |= {"cards": [card.pk], "providers": [p.pk for p in providers]}
    return api.post("/api/runs/batch/", body, format="json")


def launch_from_cli(card, providers, *, version=None, case_ids=None, tags=None, **config):
    args = [card.slug, "--user", "root"]
    for provider in providers:
        args += ["--provider", provider.name]
    for case_id in case_ids or []:
        args += ["--case", str(case_id)]
    for tag in tags or []:
        args += ["--tag", tag]
    if version:
        args += ["--prompt-version", str(version)]
    for name, flag in CLI_FLAGS.items():
        if name in config:
            args += [flag, str(config[name])]
    args += ["--stop-on-failure"] if config.get("stop_on_failure") else []
    args += ["--cache"] if config.get("use_cache") else []
    call_command("run_card", *args, stdout=StringIO(), stderr=StringIO())


def runs_after(last_pk: int) -> list[TestRun]:
    return list(TestRun.objects.filter(pk__gt=last_pk).order_by("pk"))


def last_pk() -> int:
    return TestRun.objects.order_by("-pk").values_list("pk", flat=True).first() or 0


def shape(runs: list[TestRun]) -> list[tuple]:
    """What a launch made, apart from ids: per run its card, version, provider, cases in
    order, settings and launcher; and whether the runs share one comparison group."""
    rows = sorted(
        (
            run.card.slug,
            run.version.number,
            run.provider.name,
            tuple(run.results.order_by("position").values_list("case_name", flat=True)),
            run.priority,
            run.max_concurrent_tests,
            run.timeout_seconds,
            run.max_retries,
            run.repeats,
            run.stop_on_failure,
            run.use_cache,
            run.launched_by.username,
            run.status,
        )
        for run in runs
    )
    groups = {run.comparison_group for run in runs}
    grouped = len(groups) == 1 and None not in groups if len(runs) > 1 else groups == {None}
    return [*rows, ("one comparison group" if len(runs) > 1 else "no group", grouped)]


def launch_everywhere(web, api, card, providers, *, admin: bool, **launch) -> list[list]:
    """The same launch from each entry point; returns what each made, in order."""
    made = []
    entry_points = [
        lambda: launch_from_page(web, card, providers, **launch),
        lambda: launch_from_api(api, card, providers, **launch),
        lambda: launch_from_cli(card, providers, **launch),
    ]
    if admin:
        entry_points.append(lambda: launch_from_admin(web, [card], providers, **launch))
    for entry_point in entry_points:
        before = last_pk()
        entry_point()
        made.append(runs_after(before))
    return made


def test_a_version_and_chosen_cases_on_two_providers_make_the_same_runs_everywhere(
    web, api, card, providers
):
    chosen = list(card.cases.filter(name__in=["case 3", "case 0"]).values_list("pk", flat=True))
    made = launch_everywhere(
        web, api, card, providers, admin=False, version=1, case_ids=chosen, **SETTINGS
    )
    shapes = [shape(runs) for runs in made]
    assert shapes[0] == shapes[1] == shapes[2]
    assert shapes[0][0][:4] == ("greeting", 1, "Second sim", ("case 0", "case 3"))
    assert shapes[0][0][4:12] == (5, 3, 20.0, 1, 2, True, True, "root")
    assert shapes[0][-1] == ("one comparison group", True)
    groups = [runs[0].comparison_group for runs in made]
    assert len(set(groups)) == 3  # each launch is its own comparison


def test_tagged_cases_of_the_latest_version_make_the_same_runs_from_all_four(
    web, api, card, providers
):
    made = launch_everywhere(web, api, card, providers, admin=True, tags=["smoke"], **SETTINGS)
    shapes = [shape(runs) for runs in made]
    assert shapes[0] == shapes[1] == shapes[2] == shapes[3]
    assert {row[:4] for row in shapes[0][:-1]} == {
        ("greeting", 2, "Test simulator", ("case 1", "case 3")),
        ("greeting", 2, "Second sim", ("case 1", "case 3")),
    }
    assert shapes[0][-1] == ("one comparison group", True)


def test_one_provider_with_the_defaults_makes_one_ungrouped_run_from_all_four(
    web, api, card, simulator
):
    made = launch_everywhere(web, api, card, [simulator], admin=True, **DEFAULTS)
    shapes = [shape(runs) for runs in made]
    assert shapes[0] == shapes[1] == shapes[2] == shapes[3]
    assert shapes[0] == [
        (
            "greeting", 2, "Test simulator", ("case 0", "case 1", "case 3"),
            0, 4, 60.0, 2, 1, False, False, "root", "queued",
        ),
        ("no group", True),
    ]  # fmt: skip


def test_the_admin_action_launches_all_cards_or_none(web, make_card, providers):
    good, empty = make_card("good"), make_card("empty", cases=0)
    response = launch_from_admin(web, [good, empty], providers)
    assert response.status_code == 200
    assert "Empty has no enabled test cases to run." in response.content.decode()
    assert not TestRun.objects.exists()

    response = launch_from_admin(web, [good, make_card("other")], providers)
    runs = list(TestRun.objects.all())
    assert len(runs) == 4 and len({run.comparison_group for run in runs}) == 1
    assert response["Location"] == reverse("comparison", args=[runs[0].comparison_group])


# --- Bounds: declared on the model, refused everywhere in its words -----------------------

OUT_OF_BOUNDS = [
    ("repeats", 21, "Ensure this value is less than or equal to 20."),
    ("repeats", 0, "Ensure this value is greater than or equal to 1."),
    ("timeout_seconds", 3601, "Ensure this value is less than or equal to 3600."),
    ("max_concurrent_tests", 65, "Ensure this value is less than or equal to 64."),
    ("max_retries", 11, "Ensure this value is less than or equal to 10."),
    ("priority", -101, "Ensure this value is greater than or equal to -100."),
]


@pytest.mark.parametrize("field, value, message", OUT_OF_BOUNDS)
def test_an_out_of_bounds_setting_is_refused_everywhere_with_the_models_message(
    web, api, card, simulator, field, value, message
):
    others = [f.name for f in TestRun._meta.fields if f.name != field]
    with pytest.raises(ValidationError) as model:
        TestRun(**{field: value}).clean_fields(exclude=others)
    assert model.value.message_dict == {field: [message]}

    page = launch_from_page(web, card, [simulator], **{field: value})
    assert page.status_code == 200 and page.context["form"].errors == {field: [message]}

    admin = launch_from_admin(web, [card], [simulator], **{field: value})
    assert admin.status_code == 200 and admin.context["form"].errors == {field: [message]}

    response = launch_from_api(api, card, [simulator], **{field: value})
    assert response.status_code == 400 and response.json() == {field: [message]}

    with pytest.raises(CommandError) as cli:
        launch_from_cli(card, [simulator], **{field: value})
    assert str(cli.value) == f"{CLI_FLAGS[field]}: {message}"

    with pytest.raises(ValidationError) as service:
        launching.launch_runs(cards=[card], providers=[simulator], **{field: value})
    assert service.value.message_dict == {field: [message]}
    assert not TestRun.objects.exists()


def test_the_product_bounds_themselves_are_accepted_everywhere(web, api, card, simulator):
    highest = {"max_concurrent_tests": 64, "timeout_seconds": 3600, "max_retries": 10}
    highest |= {"repeats": 20, "priority": 100}
    made = launch_everywhere(web, api, card, [simulator], admin=True, **highest)
    assert [len(runs) for runs in made] == [1, 1, 1, 1]
    assert len({shape(runs)[0] for runs in made}) == 1


# --- One pin, one rule ------------------------------------------------------------------


def test_the_report_page_the_api_and_the_admin_pin_a_baseline_by_the_same_rule(
    web, api, card, make_card, simulator
):
    own = launching.launch_run(card=card, provider=simulator)
    foreign = launching.launch_run(card=make_card("other"), provider=simulator)

    web.post(reverse("pin-baseline", args=[own.pk]))
    assert PromptCard.objects.get(pk=card.pk).baseline_run == own
    web.post(reverse("pin-baseline", args=[own.pk]), {"unpin": "1"})
    assert PromptCard.objects.get(pk=card.pk).baseline_run is None

    refused = api.patch(f"/api/cards/{card.pk}/", {"baseline_run": foreign.pk}, format="json")
    assert refused.status_code == 400
    assert refused.json() == {"baseline_run": ["Pick a run of this card."]}
    pinned = api.patch(f"/api/cards/{card.pk}/", {"baseline_run": own.pk}, format="json")
    assert pinned.status_code == 200 and pinned.json()["baseline_run"] == own.pk
    assert PromptCard.objects.get(pk=card.pk).baseline_run == own

    url = reverse("admin:testruns_promptcard_change", args=[card.pk])
    response = web.post(url, card_form(card, baseline_run=str(foreign.pk)))
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["baseline_run"] == ["Pick a run of this card."]
    assert PromptCard.objects.get(pk=card.pk).baseline_run == own


# --- Limits go through engine.limits ------------------------------------------------------


def test_a_semaphore_added_in_the_admin_gets_its_row_through_the_limits_service(web):
    response = web.post(
        reverse("admin:testruns_semaphore_add"), {"name": "provider:999", "limit": 5}
    )
    assert response.status_code == 302
    semaphore = Semaphore.objects.get(name="provider:999")
    assert (semaphore.limit, semaphore.in_use) == (5, 0)
