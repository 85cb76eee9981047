"""The case editor in a real browser: an admin writes a card and its cases through the rows
(variables from the template as it is typed, assertions picked from a select), makes a
mistake, reads it at the field, fixes it and saves. Screenshots: case-editor and
case-editor-error in test-output/screenshots/."""

from __future__ import annotations

import re

import pytest

from testruns.models import PromptCard
from tests.browser import PASSWORD, log_in, screenshot

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]


def test_an_admin_writes_a_card_with_cases_through_the_editor(context, expect, django_user_model):
    django_user_model.objects.create_superuser("root", password=PASSWORD)
    page = context.new_page()
    log_in(page, expect, username="root")
    page.goto("/admin/testruns/promptcard/add/")
    page.fill("#id_name", "Refund policy")
    page.fill("#id_template", "Dear {{ customer }}, {{ question }}")
    expect(page.locator("#id_slug")).to_have_value("refund-policy")  # the admin's prepopulate

    # The first case: one row per variable the template reads, typed a moment ago.
    page.click("#cases-group .add-row a")
    first = page.locator("#cases-0")
    first.locator("input[name=cases-0-name]").fill("Asks for a refund")
    keys = first.locator(".field-variables .ce-key")
    expect(keys).to_have_count(2)
    expect(keys.nth(0)).to_have_value("customer")
    expect(keys.nth(1)).to_have_value("question")
    page.fill("#id_template", "Dear {{ customer }}, {{ question }} (order {{ order_id }})")
    expect(keys).to_have_count(3)
    first.get_by_label("Value of customer").fill("Ada")
    first.get_by_label("Value of question").fill("Can I get my money back?")
    first.get_by_label("Value of order_id").fill("A-1001")

    first.locator(".field-assertions .ce-add").click()
    refund = first.locator(".ce-assert-row").nth(0)
    refund.locator("select.ce-type").select_option("icontains")
    refund.locator(".ce-value").fill("refund")
    expect(refund.locator(".ce-help")).to_contain_text("ignoring case")
    expect(refund.locator(".ce-help a")).to_have_attribute(
        "href", "/reference/assertions/#icontains"
    )
    first.locator(".field-assertions .ce-add").click()
    length = first.locator(".ce-assert-row").nth(1)
    length.locator("select.ce-type").select_option("word-count")
    length.locator("input.ce-min").fill("5")
    length.locator("input.ce-max").fill("120")
    length.locator("input.ce-weight").fill("2")

    # The second case, its assertions typed as raw JSON: the page says while it is broken...
    page.click("#cases-group .add-row a")
    second = page.locator("#cases-1")
    second.locator("input[name=cases-1-name]").fill("Apologises")
    second.get_by_label("Value of customer").fill("Bo")
    second.get_by_label("Value of question").fill("Where is my parcel?")
    second.get_by_label("Value of order_id").fill("B-2002")
    second.locator(".field-assertions .ce-raw-toggle").check()
    raw = second.locator("textarea[name=cases-1-assertions]")
    raw.fill('[{"type": "icontain", "value": "sorry"}')
    expect(second.locator(".field-assertions .ce-note")).to_contain_text("Not valid JSON yet")
    raw.fill('[{"type": "icontain", "value": "sorry"}]')  # ...and a misspelt type it cannot see
    expect(second.locator(".field-assertions .ce-note")).to_have_text("")
    screenshot(page, "case-editor")
    page.click("input[name=_save]")

    # The server's message at the field, and at the row it is about; nothing was saved.
    errors = page.locator("#cases-1 .field-assertions .errorlist")
    expect(errors).to_have_text('assertion 1: unknown type "icontain"; did you mean "icontains"?')
    expect(page.locator("#cases-1 .field-variables .errorlist")).to_have_count(0)
    mistaken = page.locator("#cases-1 .ce-assert-row").nth(0)
    expect(mistaken.locator(".ce-row-note")).to_contain_text('did you mean "icontains"?')
    expect(mistaken.locator("select.ce-type")).to_have_value("icontain")
    expect(page.locator("#cases-0").get_by_label("Value of customer")).to_have_value("Ada")
    screenshot(page, "case-editor-error")
    assert not PromptCard.objects.exists()

    mistaken.locator("select.ce-type").select_option("icontains")
    expect(mistaken.locator(".ce-value")).to_have_value("sorry")
    page.click("input[name=_save]")
    page.wait_for_url(re.compile(r"/admin/testruns/promptcard/$"))

    card = PromptCard.objects.get(slug="refund-policy")
    assert card.template == "Dear {{ customer }}, {{ question }} (order {{ order_id }})"
    saved = [
        (case.name, case.order, case.variables, case.assertions)
        for case in card.cases.order_by("order")
    ]
    assert saved == [
        (
            "Asks for a refund",
            0,
            {"customer": "Ada", "question": "Can I get my money back?", "order_id": "A-1001"},
            [
                {"type": "icontains", "value": "refund"},
                {"type": "word-count", "value": {"min": 5, "max": 120}, "weight": 2},
            ],
        ),
        (
            "Apologises",
            1,
            {"customer": "Bo", "question": "Where is my parcel?", "order_id": "B-2002"},
            [{"type": "icontains", "value": "sorry"}],
        ),
    ]

    # The reference the rows link to, at the type's own entry.
    page.goto("/reference/assertions/#icontains")
    expect(page.locator("h3#icontains")).to_have_text("icontains")
    expect(page.locator("h3#not-is-json")).to_be_visible()
