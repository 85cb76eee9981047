"""No dead ends: a card's admin page and its history lead to launching it, "View on site"
leads to its runs, the launch page opens on the card asked for with the user's last providers
and settings, a launch's banner is said once, and no page asks for a file that is missing."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Permission
from django.contrib.staticfiles import finders
from django.test import Client
from django.urls import reverse

from testruns.models import Provider, TestRun
from tests.test_pages import launch_form

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(django_user_model):
    client = Client()
    client.force_login(django_user_model.objects.create_superuser("root", password="root-pw-1"))
    return client


@pytest.fixture
def staff_client(django_user_model):
    """Staff who may edit cards but not launch runs."""
    client = Client()
    staff = django_user_model.objects.create_user("staff", password="staff-pw-1", is_staff=True)
    staff.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_promptcard", "change_promptcard"])
    )
    client.force_login(staff)
    return client


def hrefs(page: str) -> list[str]:
    return [href.replace("&amp;", "&") for href in re.findall(r'href="([^"]*)"', page)]


def launch_url(card) -> str:
    return f"{reverse('launch')}?card={card.pk}"


def history_url(card) -> str:
    return f"{reverse('history')}?card={card.pk}"


# --- From a card to launching it -------------------------------------------------------------


def test_a_cards_admin_page_has_run_this_card_leading_to_the_launch_page(
    admin_client, make_card, simulator
):
    make_card("alpha")
    card = make_card("zeta")
    page = admin_client.get(reverse("admin:testruns_promptcard_change", args=[card.pk]))
    content = page.content.decode()
    assert 'id="run-this-card"' in content and launch_url(card) in hrefs(content)

    launch = admin_client.get(launch_url(card))
    assert launch.status_code == 200 and launch.context["card"] == card
    assert f'<option value="{card.pk}" selected>' in launch.content.decode()


def test_run_this_card_is_only_offered_to_those_who_may_launch(staff_client, make_card):
    card = make_card()
    page = staff_client.get(reverse("admin:testruns_promptcard_change", args=[card.pk]))
    assert page.status_code == 200 and 'id="run-this-card"' not in page.content.decode()


def test_view_on_site_opens_the_cards_history(admin_client, make_card, simulator):
    card = make_card(tags=["support", "refunds"])
    page = admin_client.get(reverse("admin:testruns_promptcard_change", args=[card.pk]))
    content = page.content.decode()
    assert "View on site" in content and history_url(card) in hrefs(content)
    # It no longer loops back: the admin's own page is not where it leads.
    assert reverse("admin:view_on_site", args=[page.context["content_type_id"], card.pk]) not in (
        hrefs(content)
    )

    history = admin_client.get(history_url(card)).content.decode()
    assert 'id="card-summary"' in history and card.name in history
    assert '<span class="chip">support</span><span class="chip">refunds</span>' in history
    # ... which leads on to launching it, and back to editing it.
    assert launch_url(card) in hrefs(history)
    assert reverse("admin:testruns_promptcard_change", args=[card.pk]) in hrefs(history)


def test_a_cards_history_offers_run_this_card_only_to_launchers(
    client, django_user_model, launcher, make_card
):
    card = make_card()
    client.force_login(launcher)
    assert launch_url(card) in hrefs(client.get(history_url(card)).content.decode())

    viewer = django_user_model.objects.create_user("viewer", password="viewer-pw-1")
    client.force_login(viewer)
    page = client.get(history_url(card)).content.decode()
    assert 'id="card-summary"' in page and 'id="run-this-card"' not in page


def test_history_rows_lead_to_their_cards_history(client, launcher, make_card, simulator):
    card = make_card()
    client.force_login(launcher)
    client.post(reverse("launch"), launch_form(card, [simulator]))
    page = client.get(reverse("history")).content.decode()
    assert f"?card={card.pk}" in hrefs(page)


# --- The launch page remembers --------------------------------------------------------------


def checked_providers(page: str) -> set[int]:
    return {
        int(value)
        for value in re.findall(
            r'<input type="checkbox" name="providers" value="(\d+)"[^>]*checked', page
        )
    }


def input_value(page: str, name: str) -> str:
    return re.search(rf'<input type="number" name="{name}" value="([^"]*)"', page).group(1)


def test_the_launch_page_opens_on_the_card_asked_for(client, launcher, make_card):
    make_card("alpha")
    chosen = make_card("zeta")
    client.force_login(launcher)
    assert client.get(reverse("launch")).context["card"].slug == "alpha"  # the first by name
    assert client.get(launch_url(chosen)).context["card"] == chosen


def test_the_launch_page_offers_the_last_launchs_card_providers_and_settings(
    client, launcher, make_card, simulator
):
    other = Provider.objects.create(name="Other sim", kind="simulator", parameters={})
    make_card("alpha")
    zeta, beta = make_card("zeta"), make_card("beta")
    client.force_login(launcher)
    first = client.get(launch_url(zeta)).content.decode()
    assert checked_providers(first) == set()  # nothing to remember yet

    client.post(
        reverse("launch"),
        launch_form(
            zeta,
            [other],
            max_concurrent_tests=2,
            timeout_seconds=15,
            max_retries=0,
            repeats=3,
            priority=7,
            use_cache="on",
            grader_provider=simulator.pk,
        ),
    )
    assert TestRun.objects.get().provider == other

    # Without ?card=, the card launched last; with it, that card: the same providers and
    # settings either way.
    again = client.get(reverse("launch"))
    assert again.context["card"] == zeta
    for page in (again.content.decode(), client.get(launch_url(beta)).content.decode()):
        assert checked_providers(page) == {other.pk}
        assert [
            input_value(page, name)
            for name in ("max_concurrent_tests", "timeout_seconds", "max_retries", "repeats")
        ] == ["2", "15.0", "0", "3"]
        assert input_value(page, "priority") == "7"
        assert re.search(r'name="use_cache"[^>]*checked', page)
        assert not re.search(r'name="stop_on_failure"[^>]*checked', page)
        assert f'<option value="{simulator.pk}" selected>' in page  # the grader
        assert "as at your last launch" in page


def test_a_remembered_provider_since_disabled_is_not_offered(
    client, launcher, make_card, simulator
):
    card = make_card()
    client.force_login(launcher)
    client.post(reverse("launch"), launch_form(card, [simulator]))
    Provider.objects.filter(pk=simulator.pk).update(enabled=False)
    page = client.get(reverse("launch")).content.decode()
    assert page.count('name="providers"') == 0 and checked_providers(page) == set()


# --- Banners say the present ------------------------------------------------------------------


def test_the_launch_banner_shows_once_on_the_runs_page_and_then_never(
    client, launcher, make_card, simulator
):
    card = make_card()
    client.force_login(launcher)
    response = client.post(reverse("launch"), launch_form(card, [simulator]))
    run = TestRun.objects.get()
    banner = f"Run #{run.pk} launched."

    landing = client.get(response["Location"]).content.decode()
    assert banner in landing
    assert re.search(r'<p class="flash transient success" role="status">', landing)

    TestRun.objects.filter(pk=run.pk).update(status="succeeded")
    for url in (run.get_absolute_url(), reverse("report", args=[run.pk]), reverse("history")):
        assert "launched." not in client.get(url).content.decode(), url


def test_the_admin_launch_banner_is_transient_too(admin_client, make_card, simulator):
    card = make_card()
    response = admin_client.post(
        reverse("admin:testruns_promptcard_changelist"),
        {
            "action": "launch_runs",
            "_selected_action": [card.pk],
            "launch": "1",
            "providers": simulator.pk,
        },
    )
    landing = admin_client.get(response["Location"]).content.decode()
    assert re.search(r'<p class="flash transient success" role="status">Launched 1 run', landing)
    assert "Launched 1 run" not in admin_client.get(response["Location"]).content.decode()


# --- The smaller things ---------------------------------------------------------------------------


def test_tags_are_chips_in_the_cards_list(admin_client, make_card):
    make_card(tags=["support", "refunds"])
    page = admin_client.get(reverse("admin:testruns_promptcard_changelist")).content.decode()
    assert '<span class="tag-chip">support</span><span class="tag-chip">refunds</span>' in page
    assert "support,refunds" not in page and "support, refunds" not in page


def test_every_page_names_an_icon_that_exists(client, admin_client, launcher, make_card):
    """Without one the browser asks for /favicon.ico on every page: a 404 in its console."""
    card = make_card()
    client.force_login(launcher)
    pages = [
        client.get(reverse("dashboard")),
        client.get(reverse("launch")),
        client.get(reverse("history")),
        admin_client.get(reverse("admin:index")),
        admin_client.get(reverse("admin:testruns_promptcard_change", args=[card.pk])),
    ]
    for page in pages:
        icon = re.search(r'<link rel="icon" href="([^"]+)"', page.content.decode())
        assert icon, page.request["PATH_INFO"]
        assert icon.group(1) == "/static/testruns/favicon.svg"
    assert finders.find("testruns/favicon.svg")
    assert Client().get("/static/testruns/favicon.svg").status_code == 200
