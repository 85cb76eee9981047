"""Versions (issue 12): a version's page with its diff against the version before (system
prompt and template), "Restore this version" as a new version, and the admin asking for a
change note when the prompt changed."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from testruns.catalog.cards import restore_version, save_card
from testruns.engine import launching
from testruns.models import PromptCard
from tests.test_admin import card_form
from tests.test_pages import finish

pytestmark = pytest.mark.django_db


@pytest.fixture
def card(make_card, user):
    """Three versions: v2 changed only the system prompt, v3 only the template."""
    card = make_card(cases=1, system_prompt="Be brief.", template="Say hello to {{ name }}.")
    card.system_prompt = "Be brief and kind."
    save_card(card, user=user, note="kinder")
    card.template = "Say hello to {{ name }}, by name."
    save_card(card, user=user, note="")
    return card


@pytest.fixture
def admin_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("root", password="root-pw-1"))
    return client


@pytest.fixture
def editor(user):
    user.user_permissions.add(Permission.objects.get(codename="change_promptcard"))
    return user


def version_url(card: PromptCard, number: int) -> str:
    return reverse("version", args=[card.pk, number])


def page(client, card: PromptCard, number: int) -> str:
    response = client.get(version_url(card, number))
    assert response.status_code == 200
    return response.content.decode()


def test_a_system_prompt_change_shows_as_a_diff_with_its_author_date_and_note(client, card, user):
    client.force_login(user)
    html = page(client, card, 2)
    assert '<pre class="diff" id="system-prompt-diff">Be <ins>brief and kind.</ins>' not in html
    assert '<pre class="diff" id="system-prompt-diff">Be brief<ins> and kind</ins>.' in html
    assert '<p class="muted" id="template-diff">Unchanged.</p>' in html
    assert "By alice · " in html and '<q id="change-note">kinder</q>' in html
    assert card.versions.get(number=2).created_at.strftime("%Y-%m-%d %H:%M") in html
    assert f'id="previous-version" rel="prev" href="{version_url(card, 1)}"' in html
    assert f'id="next-version" rel="next" href="{version_url(card, 3)}"' in html


def test_a_template_change_shows_as_a_diff_and_the_first_version_has_none(client, card, user):
    client.force_login(user)
    html = page(client, card, 3)
    assert '<pre class="diff" id="template-diff">Say hello to {{ name }}<ins>, by name</ins>.' in (
        html
    )
    assert '<p class="muted" id="system-prompt-diff">Unchanged.</p>' in html
    assert "no change note" in html and 'id="next-version"' not in html
    first = page(client, card, 1)
    assert 'id="version-diff"' not in first and "first version" in first
    assert '<pre class="output full" id="template">Say hello to {{ name }}.</pre>' in first


def test_the_version_page_escapes_the_prompt_and_needs_a_login(client, make_card, user):
    card = make_card(cases=0, template="<script>window.__xss=1</script> {{ name }}")
    card.template = "<b>{{ name }}</b>"
    save_card(card, user=user)
    assert client.get(version_url(card, 2)).status_code == 302  # to the login page
    client.force_login(user)
    html = page(client, card, 2)
    assert "<script>window" not in html and "<b>{{" not in html
    assert "&lt;b&gt;{{ name }}&lt;/b&gt;" in html
    assert client.get(version_url(card, 9)).status_code == 404


def test_restore_makes_a_new_version_and_leaves_the_history_alone(client, card, editor):
    client.force_login(editor)
    before = list(card.versions.order_by("number").values_list("number", "template", "change_note"))
    assert 'id="restore-version"' in page(client, card, 1)
    response = client.post(reverse("version-restore", args=[card.pk, 1]))
    assert response.status_code == 302 and response["Location"] == version_url(card, 4)
    card.refresh_from_db()
    latest = card.versions.order_by("-number").first()
    assert (latest.number, latest.change_note, latest.author) == (4, "Restored v1", editor)
    assert (latest.system_prompt, latest.template) == ("Be brief.", "Say hello to {{ name }}.")
    assert (card.system_prompt, card.template) == (latest.system_prompt, latest.template)
    after = list(card.versions.order_by("number").values_list("number", "template", "change_note"))
    assert after[:3] == before
    landing = client.get(response["Location"]).content.decode()
    assert "Restored v1 as v4." in landing
    assert 'id="restore-version"' not in landing  # it is the card's prompt now
    # v1 now diffs against nothing new; restoring it again changes nothing.
    assert restore_version(card.versions.get(number=1), user=editor) == (latest, False)
    assert card.versions.count() == 4


def test_restore_keeps_what_was_saved_on_the_card_since(card, editor):
    stale = PromptCard.objects.get(pk=card.pk)
    PromptCard.objects.filter(pk=card.pk).update(name="Renamed meanwhile")
    restore_version(stale.versions.get(number=1), user=editor)
    assert PromptCard.objects.get(pk=card.pk).name == "Renamed meanwhile"


def test_restore_needs_the_change_card_permission(client, card, launcher):
    client.force_login(launcher)  # may launch runs, not change cards
    assert 'id="restore-version"' not in page(client, card, 1)
    response = client.post(reverse("version-restore", args=[card.pk, 1]))
    assert response.status_code == 403
    assert card.versions.count() == 3
    assert client.get(reverse("version-restore", args=[card.pk, 1])).status_code == 405


def test_the_report_links_the_version_its_run_pinned(client, card, launcher, simulator):
    version = card.versions.get(number=2)
    run = launching.launch_run(card=card, provider=simulator, user=launcher, version=version)
    finish(run, ["passed"])
    client.force_login(launcher)
    html = client.get(reverse("report", args=[run.pk])).content.decode()
    assert f'<a id="report-version" href="{version_url(card, 2)}">prompt v2</a>' in html
    assert str(run.pk) in page(client, card, 2)  # the version lists its runs


# --- In the admin ----------------------------------------------------------------------------


def test_the_admin_lists_versions_with_their_system_prompt_and_links_them(admin_client, card):
    html = admin_client.get(reverse("admin:testruns_promptcard_change", args=[card.pk]))
    html = html.content.decode()
    for number in (1, 2, 3):
        assert f'<a href="{version_url(card, number)}" class="version-link">v{number}</a>' in html
    assert "Be brief and kind." in html


def test_the_admin_truncates_long_prompts_in_the_version_list(admin_client, make_card):
    card = make_card(cases=0, system_prompt="word " * 200)
    html = admin_client.get(reverse("admin:testruns_promptcard_change", args=[card.pk]))
    [shown] = re.findall(
        r'<td class="field-system_prompt_start">\s*<p>(.*?)</p>', html.content.decode(), re.S
    )
    assert shown.startswith("word word") and shown.endswith("…") and len(shown) == 120


def test_the_admin_asks_for_a_change_note_once_when_the_prompt_changed(admin_client, card):
    url = reverse("admin:testruns_promptcard_change", args=[card.pk])
    changed = card_form(card, system_prompt="Be terse.")
    asked = admin_client.post(url, changed)
    assert asked.status_code == 200
    errors = asked.context["adminform"].form.errors
    assert errors["change_note"] == [
        "You changed the prompt: add a change note, or save again to save without one."
    ]
    assert card.versions.count() == 3
    html = asked.content.decode()
    assert '<input type="hidden" name="change_note_confirmed" value="1">' in html
    assert "Be terse.</textarea>" in html  # what was typed stays

    # Saving again (the page now carries the flag) saves without a note.
    saved = admin_client.post(url, {**changed, "change_note_confirmed": "1"})
    assert saved.status_code == 302
    latest = card.versions.order_by("-number").first()
    assert (latest.number, latest.system_prompt, latest.change_note) == (4, "Be terse.", "")


def test_the_admin_takes_a_change_note_or_no_prompt_change_at_once(admin_client, card):
    url = reverse("admin:testruns_promptcard_change", args=[card.pk])
    noted = admin_client.post(url, card_form(card, template="Hi {{ name }}", change_note="short"))
    assert noted.status_code == 302
    assert card.versions.order_by("-number").first().change_note == "short"
    card.refresh_from_db()
    untouched = card_form(card, description="only this", template=card.template + "")
    assert admin_client.post(url, untouched).status_code == 302
    # A browser sends a textarea's line ends as CRLF: not a change of the prompt.
    card.template = "Line one\nline two {{ name }}"
    save_card(card)
    versions = card.versions.count()
    crlf = card_form(card, template="Line one\r\nline two {{ name }}")
    assert admin_client.post(url, crlf).status_code == 302
    assert card.versions.count() == versions
    new_card = card_form(slug="brand-new", name="Brand new")
    assert admin_client.post(reverse("admin:testruns_promptcard_add"), new_card).status_code == 302
