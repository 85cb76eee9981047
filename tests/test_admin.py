"""The admin renders, saves, validates and rejects bad input with field errors, never a 500."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from testruns.engine.launching import launch_run
from testruns.models import PromptCard, PromptVersion, Provider, Semaphore, TestRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, django_user_model):
    admin = django_user_model.objects.create_superuser("root", password="root-password-1")
    client.force_login(admin)
    client.user = admin
    return client


@pytest.fixture
def staff_client(django_user_model):
    """Staff who may edit cards and providers but hold neither launch nor cancel."""
    client = Client()
    staff = django_user_model.objects.create_user("staff", password="staff-pw-1", is_staff=True)
    staff.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="testruns",
            codename__regex=r"^(view|add|change)_(promptcard|testcase|provider|testrun)$",
        )
    )
    client.force_login(staff)
    return client


def card_form(card: PromptCard | None = None, cases: list[dict] | None = None, **fields) -> dict:
    """The POST body of the card change form with its two inlines."""
    data = {
        "name": "Greeter",
        "slug": "greeter",
        "description": "",
        "tags": "demo,hello",
        "owner": "",
        "system_prompt": "",
        "template": "Hello {{ name }}",
        "change_note": "",
        "baseline_run": "",
        "versions-TOTAL_FORMS": "0",
        "versions-INITIAL_FORMS": "0",
        "versions-MIN_NUM_FORMS": "0",
        "versions-MAX_NUM_FORMS": "1000",
    }
    if card is not None:
        data.update(
            name=card.name,
            slug=card.slug,
            template=card.template,
            system_prompt=card.system_prompt,
            tags=",".join(card.tags),
        )
        data["versions-INITIAL_FORMS"] = data["versions-TOTAL_FORMS"] = str(card.versions.count())
        for i, version in enumerate(card.versions.order_by("-number")):
            data[f"versions-{i}-id"] = str(version.pk)
            data[f"versions-{i}-card"] = str(card.pk)
    data.update(fields)
    cases = cases or []
    data.update(
        {
            "cases-TOTAL_FORMS": str(len(cases)),
            "cases-INITIAL_FORMS": str(sum(1 for c in cases if c.get("id"))),
            "cases-MIN_NUM_FORMS": "0",
            "cases-MAX_NUM_FORMS": "1000",
        }
    )
    for i, case in enumerate(cases):
        row = {
            "name": "case",
            "variables": '{"name": "Ada"}',
            "assertions": "[]",
            "enabled": "on",
            "order": "0",
            "threshold": "",
            "tags": "",
        } | case
        data.update({f"cases-{i}-{key}": value for key, value in row.items()})
    return data


def test_every_admin_page_renders(admin_client, make_card, simulator):
    card = make_card()
    run = launch_run(card=card, provider=simulator)
    urls = [reverse("admin:index")]
    for model, obj in [
        (PromptCard, card),
        (Provider, simulator),
        (TestRun, run),
        (Semaphore, Semaphore.objects.get(name="runs")),
        (PromptVersion, card.versions.first()),
    ]:
        info = model._meta.app_label, model._meta.model_name
        urls += [
            reverse("admin:{}_{}_changelist".format(*info)),
            reverse("admin:{}_{}_change".format(*info), args=[obj.pk]),
        ]
    urls += [
        reverse("admin:testruns_promptcard_add"),
        reverse("admin:testruns_provider_add"),
        reverse("admin:testruns_promptcard_import"),
    ]
    for url in urls:
        assert admin_client.get(url).status_code == 200, url


def test_card_changelist_shows_last_status_and_pass_rate_and_filters(
    admin_client, make_card, simulator
):
    card = make_card(cases=4)
    run = launch_run(card=card, provider=simulator)
    # Three passed and one failed: the pass rate is over evaluated cases (one definition,
    # reporting.statistics), which here are all four.
    TestRun.objects.filter(pk=run.pk).update(
        status="failed", passed_count=3, failed_count=1, finished_at=run.queued_at
    )
    page = admin_client.get(reverse("admin:testruns_promptcard_changelist")).content.decode()
    assert "75 %" in page and "failed" in page
    filtered = admin_client.get(
        reverse("admin:testruns_promptcard_changelist") + "?last_status=never"
    )
    assert card.name not in filtered.content.decode().split("result_list")[-1]


def test_creating_a_card_with_cases_creates_version_one(admin_client):
    response = admin_client.post(
        reverse("admin:testruns_promptcard_add"), card_form(cases=[{"name": "Ada"}])
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    card = PromptCard.objects.get(slug="greeter")
    assert card.tags == ["demo", "hello"] and card.owner == admin_client.user
    assert list(card.versions.values_list("number", "template")) == [(1, "Hello {{ name }}")]
    assert card.cases.get().variables == {"name": "Ada"}


def test_a_version_is_created_exactly_when_the_prompt_changes(admin_client, make_card):
    card = make_card(cases=0)
    url = reverse("admin:testruns_promptcard_change", args=[card.pk])

    admin_client.post(url, card_form(card, description="only the description changed"))
    assert card.versions.count() == 1

    admin_client.post(url, card_form(card, template="Hi {{ name }}!", change_note="friendlier"))
    card.refresh_from_db()
    latest = card.versions.order_by("-number").first()
    assert (card.versions.count(), latest.number, latest.template, latest.change_note) == (
        2,
        2,
        "Hi {{ name }}!",
        "friendlier",
    )
    assert latest.author == admin_client.user

    admin_client.post(url, card_form(card, template="Hi {{ name }}!"))
    assert card.versions.count() == 2


def test_versions_are_read_only_in_the_admin(admin_client, make_card):
    version = make_card().versions.get()
    url = reverse("admin:testruns_promptversion_change", args=[version.pk])
    admin_client.post(url, {"card": version.card_id, "number": 9, "template": "changed"})
    version.refresh_from_db()
    assert version.template == "Say hello to {{ name }}." and version.number == 1


@pytest.mark.parametrize(
    "variables, message",
    [
        ("{not json", "Enter a valid JSON"),
        ('["a list"]', "Variables must be a JSON object"),
        ('{"other": 1}', "Missing variables for the template: name."),
    ],
)
def test_bad_case_variables_are_field_errors(admin_client, variables, message):
    response = admin_client.post(
        reverse("admin:testruns_promptcard_add"), card_form(cases=[{"variables": variables}])
    )
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not PromptCard.objects.exists()


@pytest.mark.parametrize(
    "assertions, message",
    [
        ('[{"type": "containz", "value": "x"}]', "assertion 1: unknown type"),
        (
            '[{"type": "contains", "value": "x"}, {"type": "regex", "value": "(["}]',
            "assertion 2 (regex)",
        ),
        (
            '[{"type": "json-schema", "value": {"type": "no-such-type"}}]',
            "assertion 1 (json-schema)",
        ),
        ('[{"type": "latency", "value": "fast"}]', "assertion 1 (latency)"),
        ('{"type": "contains"}', "list"),
    ],
)
def test_invalid_assertions_are_rejected_naming_the_assertion(admin_client, assertions, message):
    response = admin_client.post(
        reverse("admin:testruns_promptcard_add"), card_form(cases=[{"assertions": assertions}])
    )
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not PromptCard.objects.exists()


def test_changing_the_template_names_every_case_it_leaves_uncovered(admin_client, make_card):
    card = make_card(cases=2)
    cases = [
        {"id": str(c.pk), "card": str(card.pk), "name": c.name, "variables": '{"name": "x"}'}
        for c in card.cases.all()
    ]
    response = admin_client.post(
        reverse("admin:testruns_promptcard_change", args=[card.pk]),
        card_form(card, cases=cases, template="{{ greeting }}, {{ name }}"),
    )
    page = response.content.decode()
    assert response.status_code == 200
    assert page.count("Missing variables for the template: greeting.") == 2
    card.refresh_from_db()
    assert card.template == "Say hello to {{ name }}." and card.versions.count() == 1


def test_template_syntax_error_is_a_field_error(admin_client):
    response = admin_client.post(
        reverse("admin:testruns_promptcard_add"), card_form(template="Hello {{ name ")
    )
    assert response.status_code == 200
    assert "Template error on line 1" in response.content.decode()


def provider_form(**fields) -> dict:
    return {
        "name": "Local",
        "kind": "openai",
        "model": "llama3",
        "base_url": "",
        "api_key_env": "",
        "command": "",
        "parameters": "{}",
        "max_concurrency": "4",
        "price_input_per_mtok": "0",
        "price_output_per_mtok": "0",
        "timeout_seconds": "30",
        "enabled": "on",
    } | fields


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"api_key_env": "sk-live-abc123!"}, "not the key itself"),
        ({"model": ""}, "needs a model name"),
        ({"kind": "command", "command": ""}, "needs a command"),
        ({"kind": "command", "command": "run 'unbalanced"}, "cannot be parsed"),
        ({"parameters": "{oops"}, "Enter a valid JSON"),
        ({"parameters": "[1]"}, "must be a JSON object"),
        ({"kind": "simulator", "parameters": '{"error_rate": 3}'}, "probability"),
        ({"timeout_seconds": "0"}, "must be positive"),
    ],
)
def test_bad_provider_input_is_a_field_error(admin_client, fields, message):
    response = admin_client.post(reverse("admin:testruns_provider_add"), provider_form(**fields))
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not Provider.objects.exists()


def test_only_superusers_may_create_command_providers(staff_client, admin_client):
    form = provider_form(kind="command", command="/usr/bin/cat", model="")
    response = staff_client.post(reverse("admin:testruns_provider_add"), form)
    assert response.status_code == 200 and "Only superusers" in response.content.decode()
    assert not Provider.objects.exists()
    assert admin_client.post(reverse("admin:testruns_provider_add"), form).status_code == 302
    assert Provider.objects.get().kind == "command"


def test_staff_cannot_change_an_existing_command_provider(staff_client):
    provider = Provider.objects.create(name="cmd", kind="command", command="/usr/bin/cat")
    url = reverse("admin:testruns_provider_change", args=[provider.pk])
    staff_client.post(url, provider_form(kind="command", command="/bin/sh -c evil", model=""))
    provider.refresh_from_db()
    assert provider.command == "/usr/bin/cat"


def test_staff_without_launch_or_cancel_permission_see_no_such_controls(
    staff_client, make_card, simulator
):
    make_card()
    launch_run(card=PromptCard.objects.get(), provider=simulator)
    cards = staff_client.get(reverse("admin:testruns_promptcard_changelist")).content.decode()
    runs = staff_client.get(reverse("admin:testruns_testrun_changelist")).content.decode()
    assert "launch_runs" not in cards and "cancel_runs" not in runs
    dashboard = staff_client.get(reverse("dashboard")).content.decode()
    assert f'href="{reverse("launch")}"' not in dashboard


def test_launch_action_asks_for_a_provider_then_queues_a_run(admin_client, make_card, simulator):
    card = make_card()
    url = reverse("admin:testruns_promptcard_changelist")
    chosen = {"action": "launch_runs", "_selected_action": [card.pk]}
    confirm = admin_client.post(url, chosen)
    assert confirm.status_code == 200 and "Launch runs" in confirm.content.decode()
    response = admin_client.post(
        url, chosen | {"launch": "1", "providers": simulator.pk, "priority": "2"}
    )
    run = TestRun.objects.get()
    assert response.status_code == 302 and response["Location"] == run.get_absolute_url()
    assert (run.card, run.provider, run.priority) == (card, simulator, 2)


def test_duplicate_action_copies_card_and_cases(admin_client, make_card):
    card = make_card(cases=3)
    admin_client.post(
        reverse("admin:testruns_promptcard_changelist"),
        {"action": "duplicate_cards", "_selected_action": [card.pk]},
    )
    copy = PromptCard.objects.get(slug="greeting-copy")
    assert copy.cases.count() == 3 and copy.versions.count() == 1
    assert copy.template == card.template


def test_cancel_action_cancels_a_waiting_run(admin_client, make_card, simulator):
    run = launch_run(card=make_card(), provider=simulator)
    admin_client.post(
        reverse("admin:testruns_testrun_changelist"),
        {"action": "cancel_runs", "_selected_action": [run.pk]},
    )
    run.refresh_from_db()
    assert run.status == "cancelled"


def test_test_runs_are_read_only(admin_client, make_card, simulator):
    run = launch_run(card=make_card(), provider=simulator)
    url = reverse("admin:testruns_testrun_change", args=[run.pk])
    admin_client.post(url, {"status": "succeeded"})
    run.refresh_from_db()
    assert run.status == "queued"
    assert admin_client.get(reverse("admin:testruns_testrun_add")).status_code == 403


def test_semaphore_limits_are_editable_in_the_changelist(admin_client):
    semaphore = Semaphore.objects.create(name="runs", limit=3)
    response = admin_client.post(
        reverse("admin:testruns_semaphore_changelist"),
        {
            "form-TOTAL_FORMS": "1",
            "form-INITIAL_FORMS": "1",
            "form-MIN_NUM_FORMS": "0",
            "form-MAX_NUM_FORMS": "1000",
            "form-0-id": str(semaphore.pk),
            "form-0-limit": "7",
            "_save": "Save",
        },
    )
    assert response.status_code == 302
    semaphore.refresh_from_db()
    assert semaphore.limit == 7


def test_import_page_imports_a_promptfoo_file_and_exports_it_back(admin_client):

    suite = (Path(__file__).parent / "data" / "promptfoo_suite.yaml").read_bytes()
    response = admin_client.post(
        reverse("admin:testruns_promptcard_import"),
        {"file": SimpleUploadedFile("suite.yaml", suite)},
    )
    assert response.status_code == 302
    cards = PromptCard.objects.order_by("name")
    assert cards.count() == 2 and all(card.cases.count() >= 3 for card in cards)

    export = admin_client.post(
        reverse("admin:testruns_promptcard_changelist"),
        {"action": "export_yaml", "_selected_action": [card.pk for card in cards]},
    )
    assert export["Content-Disposition"] == 'attachment; filename="prompt-cards.yaml"'
    assert b"Refund question" in export.content


def test_a_bad_import_saves_nothing_and_names_the_row(admin_client, make_card):

    card = make_card(cases=0)
    bad = b"name,__description,__expected\nAda,fine,contains: Ada\nBob,broken,regex: ([\n"
    response = admin_client.post(
        reverse("admin:testruns_promptcard_import"),
        {"file": SimpleUploadedFile("cases.csv", bad), "card": card.pk},
    )
    page = response.content.decode()
    assert response.status_code == 200 and "cases.csv: row 3" in page
    assert card.cases.count() == 0
