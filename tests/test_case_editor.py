"""The case editor in the admin (testruns/admin/case_editor.py), its errors at the field, the
order of new cases, and the assertion reference (docs/assertions.md and its page)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
import yaml
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from testruns.admin.case_editor import TYPE_HELP, JSONWithPositionField, TestCaseForm
from testruns.catalog.assertions import ASSERTION_TYPES, assertion_errors
from testruns.models import PromptCard, TestCase
from testruns.web.reference import anchor
from tests.test_admin import card_form

pytestmark = pytest.mark.django_db

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "assertions.md"


@pytest.fixture
def admin_client(client, django_user_model):
    admin = django_user_model.objects.create_superuser("root", password="root-password-1")
    client.force_login(admin)
    return client


def post_new_card(client, **case) -> str:
    response = client.post(reverse("admin:testruns_promptcard_add"), card_form(cases=[case]))
    assert response.status_code == 200, "the card should have been refused"
    assert not PromptCard.objects.exists()
    return html.unescape(response.content.decode())


def field_errors(page: str, field: str) -> list[str]:
    """The messages Django drew at one field of the first case."""
    row = page.split(f'class="form-row errors field-{field}"', 1)[1].split("</ul>", 1)[0]
    return [re.sub(r"<[^>]+>", "", item) for item in re.findall(r"<li>(.*?)</li>", row)]


# --- Errors at the field --------------------------------------------------------------------


def test_invalid_json_says_line_and_column():
    field = JSONWithPositionField()
    with pytest.raises(Exception) as excinfo:
        field.clean('{\n  "name": "Ada"\n  "tone": "warm"\n}')
    assert excinfo.value.messages == [
        "Enter a valid JSON. Line 3, column 3: Expecting ',' delimiter."
    ]


def test_broken_variables_get_their_position_and_no_follow_on_error(admin_client):
    page = post_new_card(admin_client, variables='{"name": "Ada",}')

    assert field_errors(page, "variables") == [
        "Enter a valid JSON. Line 1, column 16: Expecting property name enclosed in double quotes."
    ]
    # The model never saw the variables, so "missing" would be about a value nobody typed.
    assert "Missing variables for the template" not in page
    # What was typed comes back as typed, for the editor's raw view.
    assert '{"name": "Ada",}</textarea>' in page


def test_broken_assertions_leave_the_variables_alone(admin_client):
    page = post_new_card(admin_client, variables='{"name": "Ada"}', assertions='[{"type": }]')

    assert field_errors(page, "assertions") == [
        "Enter a valid JSON. Line 1, column 11: Expecting value."
    ]
    assert "field-variables" in page and 'errors field-variables"' not in page


def test_valid_json_still_gets_the_models_checks(admin_client):
    page = post_new_card(admin_client, variables='{"other": 1}')

    assert field_errors(page, "variables") == ["Missing variables for the template: name."]


def test_a_misspelt_type_gets_a_did_you_mean_at_the_field(admin_client):
    page = post_new_card(admin_client, assertions='[{"type": "icontain", "value": "refund"}]')

    assert field_errors(page, "assertions") == [
        'assertion 1: unknown type "icontain"; did you mean "icontains"?'
    ]
    assert "expected one of" not in page


@pytest.mark.parametrize(
    "name, message",
    [
        ("containz", 'unknown type "containz"; did you mean "contains"?'),
        ("Contains", 'unknown type "Contains"; did you mean "contains"?'),
        ("contains_any", 'unknown type "contains_any"; did you mean "contains-any"?'),
        ("jsonschema", 'unknown type "jsonschema"; did you mean "json-schema"?'),
        ("not-latency", 'unknown type "not-latency"; latency has no not- variant'),
    ],
)
def test_did_you_mean_names_the_near_type(name, message):
    assert assertion_errors([{"type": name, "value": "x"}]) == [f"assertion 1: {message}"]


def test_a_type_like_no_other_still_lists_the_types():
    (error,) = assertion_errors([{"type": "sentiment", "value": "x"}])
    assert error.startswith(
        'assertion 1: unknown type "sentiment"; expected one of: answer-relevance, bleu, contains,'
    )


# --- Order ----------------------------------------------------------------------------------


def test_new_cases_in_the_admin_go_after_the_last(admin_client, make_card):
    card = make_card(cases=3)  # orders 0, 1, 2
    TestCase.objects.filter(card=card, order=2).update(order=7)
    existing = [
        {"id": str(c.pk), "card": str(card.pk), "name": c.name, "order": str(c.order)}
        | {"variables": json.dumps(c.variables), "assertions": json.dumps(c.assertions)}
        for c in card.cases.all()
    ]
    new = [{"name": "fourth", "order": ""}, {"name": "fifth", "order": ""}]
    response = admin_client.post(
        reverse("admin:testruns_promptcard_change", args=[card.pk]),
        card_form(card, cases=existing + new),
    )

    assert response.status_code == 302, response.content.decode()[:3000]
    assert list(card.cases.values_list("name", "order")) == [
        ("case 0", 0),
        ("case 1", 1),
        ("case 2", 7),
        ("fourth", 8),
        ("fifth", 9),
    ]


def test_a_case_created_without_an_order_goes_after_the_last(make_card):
    card = make_card(cases=2)
    added = TestCase.objects.create(card=card, name="added", variables={"name": "x"})
    chosen = TestCase.objects.create(card=card, name="chosen", order=0, variables={"name": "y"})
    first = TestCase.objects.create(card=make_card("empty", cases=0), name="first")

    assert (added.order, chosen.order, first.order) == (2, 0, 0)
    added.name = "renamed"
    added.save()
    added.refresh_from_db()
    assert added.order == 2  # a saved case keeps its place


def test_the_api_puts_a_case_without_an_order_after_the_last(make_card, django_user_model):
    card = make_card(cases=2)
    api = APIClient()
    user = django_user_model.objects.create_superuser("api-root", password="root-password-1")
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    response = api.post(
        "/api/cases/", {"card": card.pk, "name": "new", "variables": {"name": "A"}}, format="json"
    )

    assert response.status_code == 201, response.json()
    assert response.json()["order"] == 2 == TestCase.objects.get(name="new").order


# --- The editor on the page -----------------------------------------------------------------


def test_the_card_page_draws_the_editor_with_the_templates_variables(admin_client, make_card):
    card = make_card(cases=1, template="Dear {{ customer }}, about {{ topic }}", system_prompt="")
    page = admin_client.get(reverse("admin:testruns_promptcard_change", args=[card.pk]))
    text = page.content.decode()

    assert page.status_code == 200
    assert text.count('class="case-editor" data-editor="variables"') == 2  # the case, the template
    assert text.count('class="case-editor" data-editor="assertions"') == 2
    assert 'data-template-variables="[&quot;customer&quot;, &quot;topic&quot;]"' in text
    assert "testruns/case_editor.js" in text and "testruns/case_editor.css" in text
    assert f'href="{reverse("assertion-reference")}"' in text
    table = json.loads(re.search(r'id="case-editor-types"[^>]*>(.*?)</script>', text)[1])
    assert {row["name"] for row in table["types"]} == ASSERTION_TYPES
    assert table["reference"] == reverse("assertion-reference")


def test_a_new_cards_page_has_the_editor_without_variables(admin_client):
    text = admin_client.get(reverse("admin:testruns_promptcard_add")).content.decode()

    assert 'data-template-variables="[]"' in text and 'id="case-editor-types"' in text


def test_posting_a_case_through_the_admin_saves_its_json(admin_client, make_card):
    card = make_card(cases=0)
    assertions = [
        {"type": "icontains", "value": "hello", "weight": 2},
        {"type": "word-count", "value": {"max": 50}},
    ]
    response = admin_client.post(
        reverse("admin:testruns_promptcard_change", args=[card.pk]),
        card_form(
            card,
            cases=[
                {
                    "name": "greets",
                    "order": "",
                    "variables": '{\n  "name": "Ada",\n  "extra": [1, 2]\n}',
                    "assertions": json.dumps(assertions),
                    "threshold": "0.5",
                }
            ],
        ),
    )

    assert response.status_code == 302, response.content.decode()[:3000]
    case = card.cases.get()
    assert (case.name, case.order, case.threshold) == ("greets", 0, 0.5)
    assert case.variables == {"name": "Ada", "extra": [1, 2]} and case.assertions == assertions


def test_empty_boxes_mean_no_variables_and_no_assertions(admin_client, make_card):
    card = make_card(cases=0, template="Hello", system_prompt="")
    response = admin_client.post(
        reverse("admin:testruns_promptcard_change", args=[card.pk]),
        card_form(card, template="Hello", cases=[{"variables": "", "assertions": ""}]),
    )

    assert response.status_code == 302, response.content.decode()[:3000]
    assert (card.cases.get().variables, card.cases.get().assertions) == ({}, [])


def test_the_form_alone_asks_the_cases_card_for_its_variables(make_card):
    card = make_card(cases=1, template="{{ b }} and {{ a }}", system_prompt="")
    form = TestCaseForm(instance=card.cases.get())

    assert 'data-template-variables="[&quot;a&quot;, &quot;b&quot;]"' in str(form["variables"])


def test_the_editor_knows_every_registered_type():
    assert {name.removeprefix("not-") for name in ASSERTION_TYPES} == set(TYPE_HELP)


# --- The assertion reference ----------------------------------------------------------------


def reference_sections() -> dict[str, str]:
    sections = re.split(r"^### ", REFERENCE.read_text(), flags=re.MULTILINE)[1:]
    return {section.split("\n", 1)[0].strip(): section for section in sections}


def test_the_reference_has_one_entry_per_type_with_valid_examples():
    sections = reference_sections()

    assert set(sections) == ASSERTION_TYPES
    for name, section in sections.items():
        examples = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
        assert examples, f"{name} has no example"
        for example in examples:
            specs = yaml.safe_load(example)
            assert [spec["type"] for spec in specs] == [name] * len(specs)
            assert assertion_errors(specs) == [], name


def test_the_reference_page_needs_a_login_and_anchors_every_type(client, user):
    url = reverse("assertion-reference")
    assert client.get(url).status_code == 302

    client.force_login(user)
    page = client.get(url)
    text = page.content.decode()
    assert page.status_code == 200
    for name in ASSERTION_TYPES:
        assert f'<h3 id="{anchor(name)}">{name}</h3>' in text, name
    assert (
        '<pre><code class="language-yaml">- type: contains\n  value: refund\n</code></pre>' in text
    )
