"""Import and export of cards and test cases (testruns/card_files.py and its two commands)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from testruns.catalog.card_files import (
    MAX_BYTES,
    CardFileError,
    assertion_from_short_form,
    export_cards,
    import_cards,
)
from testruns.models import PromptCard, PromptVersion, TestCase

DATA = Path(__file__).parent / "data"
SUITE = DATA / "promptfoo_suite.yaml"


def counts() -> tuple[int, int, int]:
    return PromptCard.objects.count(), TestCase.objects.count(), PromptVersion.objects.count()


def import_text(text: str, filename: str = "suite.yaml", **kwargs):
    return import_cards(text, filename=filename, **kwargs)


def import_error(text: str | bytes, filename: str = "suite.yaml", **kwargs) -> str:
    with pytest.raises(CardFileError) as excinfo:
        import_cards(text, filename=filename, **kwargs)
    return str(excinfo.value)


PROMPTFOO_TESTS = """
prompts: ["Summarise {{ text }}"]
tests:
  - description: first
    vars: {text: a}
    assert: [{type: contains, value: a}]
  - description: second
    vars: {text: b}
    assert: [{type: regex, value: "^b"}]
  - description: third
    vars: {text: c}
    assert: [{type: regex, value: "([unclosed"}]
"""


@pytest.mark.django_db
def test_promptfoo_suite_becomes_one_card_per_prompt_with_every_test(user):
    report = import_cards(SUITE.read_bytes(), filename=SUITE.name, user=user)

    assert (report.cards_created, report.cases_created, report.versions_created) == (2, 6, 2)
    # Named after the config's description and each prompt's label: two configs with the
    # same labels do not collide.
    formal = PromptCard.objects.get(slug="customer-support-replies-support-reply-formal")
    casual = PromptCard.objects.get(slug="customer-support-replies-support-reply-casual")
    assert formal.name == "Customer support replies: Support reply (formal)"
    assert formal.description == "Customer support replies"
    assert formal.owner == user
    assert formal.template.startswith("You are the support desk for {{ product }}.\n")
    assert casual.template == "Hey! Quick {{ product }} question: {{ question }}"
    for card in (formal, casual):
        version = card.versions.get()
        assert (version.number, version.template, version.author) == (1, card.template, user)
        assert version.change_note == "Imported from promptfoo_suite.yaml"
        names = list(card.cases.values_list("name", flat=True))
        assert names == ["Refund question", "Shipping question", "Order status as JSON"]

    refund, shipping, status = formal.cases.all()
    # defaultTest: its assertions come first, its vars fill in what a test leaves out.
    assert refund.variables == {"product": "Widget Pro", "question": "Can I get a refund?"}
    assert refund.assertions == [
        {"type": "not-contains", "value": "As an AI"},
        {"type": "icontains", "value": "refund"},
        {"type": "regex", "value": "(?i)widget\\s+pro"},
    ]
    assert refund.threshold is None
    assert shipping.variables["product"] == "Gadget"
    assert shipping.threshold == 0.6
    assert shipping.assertions[2] == {
        "type": "llm-rubric",
        "value": "Is polite and gives a time frame",
        "weight": 2,
    }
    # `metric` is kept, and options.transform runs before each assertion.
    assert status.assertions[1:] == [
        {"type": "is-json", "metric": "format", "transform": ["output.trim()"]},
        {"type": "starts-with", "value": "{", "transform": ["output.trim()"]},
    ]
    assert [case.order for case in formal.cases.all()] == [0, 1, 2]


@pytest.mark.django_db
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_export_then_import_into_an_empty_database_exports_identical_text(make_card, fmt):
    card = make_card(
        slug="support",
        cases=2,
        name="Support — ünïcode",
        description="Line one\nLine two\n",
        tags=["support", "v2"],
        system_prompt="Be kind.\nBe brief.",
        template="Customer: {{ name }}\n\n{% for item in items %}- {{ item }}\n{% endfor %}",
    )
    card.cases.update(variables={"name": "Ada", "items": ["a", "b"], "meta": {"z": 1, "a": None}})
    TestCase.objects.create(
        card=card,
        name="disabled, weighted, thresholded",
        order=5,
        enabled=False,
        tags=["slow"],
        threshold=0.75,
        variables={"name": "Line\nbreak", "items": [], "when": "2024-01-01"},
        assertions=[
            {"weight": 2, "value": {"max": 40}, "type": "word-count"},
            {"type": "regex", "value": "^\\s+x$"},
            {"type": "is-json"},
        ],
    )
    make_card(slug="another", cases=1)
    first = export_cards(PromptCard.objects.order_by("slug"), fmt)

    PromptCard.objects.all().delete()
    import_text(first, filename=f"export.{fmt}")
    second = export_cards(PromptCard.objects.order_by("slug"), fmt)

    assert second == first
    assert counts() == (2, 4, 2)


@pytest.mark.django_db
def test_yaml_export_writes_multi_line_text_as_literal_blocks(make_card):
    make_card(slug="multi", cases=1, template="Line one {{ name }}\nLine two\n")

    text = export_cards(PromptCard.objects.all(), "yaml")

    assert "    prompts:\n      - |\n        Line one {{ name }}\n        Line two\n" in text
    assert text.startswith("cards:\n  - name: Multi\n    slug: multi\n")


@pytest.mark.django_db
def test_reimporting_the_same_file_changes_nothing(user):
    import_cards(SUITE.read_bytes(), filename=SUITE.name, user=user)
    before = counts()

    report = import_cards(SUITE.read_bytes(), filename=SUITE.name, user=user)

    assert counts() == before
    assert (report.cards_created, report.cards_updated, report.cards_unchanged) == (0, 0, 2)
    assert (report.cases_created, report.cases_updated, report.cases_unchanged) == (0, 0, 6)
    assert report.versions_created == 0


@pytest.mark.django_db
def test_changed_prompt_creates_exactly_one_new_version(make_card, user):
    card = make_card(slug="greeting", cases=2)
    exported = export_cards([card], "yaml")
    changed = exported.replace("Say hello to {{ name }}.", "Greet {{ name }} warmly.")

    report = import_text(changed, user=user, update=True)

    versions = list(card.versions.order_by("number"))
    assert [v.number for v in versions] == [1, 2]
    assert (versions[1].template, versions[1].author) == ("Greet {{ name }} warmly.", user)
    assert versions[1].change_note == "Imported from suite.yaml"
    assert (report.cards_updated, report.versions_created, report.cases_updated) == (1, 1, 0)
    card.refresh_from_db()
    assert card.owner.username == "alice"  # an existing card keeps its owner


@pytest.mark.django_db
def test_import_updates_cases_by_name_adds_new_ones_after_and_leaves_others_alone(make_card):
    card = make_card(slug="greeting", cases=3)
    text = """
name: Greeting
slug: greeting
system_prompt: Be brief.
prompts: ["Say hello to {{ name }}."]
tests:
  - {description: case 1, vars: {name: Changed}, assert: [{type: contains, value: Changed}]}
  - {description: brand new, vars: {name: New}, threshold: 0.5}
"""
    with pytest.raises(CardFileError, match="card greeting: 1 new cases"):
        import_text(text)  # a stored card changes only when asked to
    report = import_text(text, update=True)

    assert (report.cases_created, report.cases_updated) == (1, 1)
    cases = {case.name: case for case in card.cases.all()}
    assert list(cases) == ["case 0", "case 1", "case 2", "brand new"]
    assert cases["case 1"].variables == {"name": "Changed"}
    assert cases["case 0"].variables == {"name": "N0"}
    assert (cases["brand new"].order, cases["brand new"].threshold) == (3, 0.5)
    assert card.versions.count() == 1


@pytest.mark.django_db
def test_csv_rows_become_cases_of_the_chosen_card(make_card):
    card = make_card(
        slug="support", cases=0, template="Customer asks about {{ product }}: {{ question }}"
    )

    report = import_cards((DATA / "cases.csv").read_bytes(), filename="cases.csv", card=card)

    assert (report.cases_created, report.versions_created) == (3, 0)
    refund, shipping, warranty = card.cases.all()
    assert refund.name == "Refund"
    assert refund.variables == {"product": "Widget Pro", "question": "Can I get a refund?"}
    assert refund.assertions == [
        {"type": "icontains", "value": "refund"},
        {"type": "not-contains", "value": "sorry"},
    ]
    assert refund.threshold is None
    assert shipping.assertions == [{"type": "contains-any", "value": ["ship", "deliver"]}]
    assert shipping.threshold == 0.5
    # No __description: named after its row, as a spreadsheet numbers it (header is row 1).
    assert warranty.name == "row 4"
    assert warranty.assertions == [
        {"type": "equals", "value": "Yes there is a warranty."},
        {"type": "regex", "value": "^Yes"},
    ]


def test_csv_short_forms_follow_promptfoo():
    assert assertion_from_short_form("contains: foo") == {"type": "contains", "value": "foo"}
    assert assertion_from_short_form("is-json") == {"type": "is-json"}
    assert assertion_from_short_form("not-regex:^a") == {"type": "not-regex", "value": "^a"}
    assert assertion_from_short_form("grade: be polite") == {
        "type": "llm-rubric",
        "value": "be polite",
    }
    assert assertion_from_short_form("latency: 500") == {"type": "latency", "value": 500}
    assert assertion_from_short_form("Paris: the capital") == {
        "type": "equals",
        "value": "Paris: the capital",
    }
    assert assertion_from_short_form("javascript: output.length < 10") == {
        "type": "javascript",
        "value": "output.length < 10",
    }
    assert assertion_from_short_form("similar(0.8): hi") == {
        "type": "similar",
        "value": "hi",
        "threshold": 0.8,
    }


@pytest.mark.django_db
def test_a_bad_regex_in_the_third_test_imports_nothing_and_names_it(make_card):
    make_card(slug="existing", cases=1)
    before = counts()

    message = import_error(PROMPTFOO_TESTS)

    assert counts() == before
    assert (
        "suite.yaml: tests[2].assert[0]: assertion 1 (regex): invalid regular expression" in message
    )


@pytest.mark.django_db
def test_every_problem_is_reported_at_once():
    text = PROMPTFOO_TESTS.replace("{text: b}", "{}").replace("value: a}", "value: ''}")

    errors = import_error(text).splitlines()

    assert [error.split(": ")[1] for error in errors] == [
        "tests[0].assert[0]",
        "tests[1].vars",
        "tests[2].assert[0]",
    ]
    assert errors[1] == "suite.yaml: tests[1].vars: Missing variables for the template: text."
    assert errors[2].startswith(
        "suite.yaml: tests[2].assert[0]: assertion 1 (regex): invalid regular expression: "
    )


@pytest.mark.django_db
def test_missing_template_variables_name_the_test_and_the_csv_row(make_card):
    card = make_card(slug="support", cases=0, template="About {{ product }}: {{ question }}")
    csv_text = "question,__description\nWhy?,first\nHow?,second\n"

    csv_message = import_error(csv_text, filename="cases.csv", card=card)
    yaml_message = import_error("prompts: ['Hi {{ name }}']\ntests: [{vars: {other: 1}}]")

    assert csv_message.splitlines() == [
        "cases.csv: row 2: Missing variables for the template: product.",
        "cases.csv: row 3: Missing variables for the template: product.",
    ]
    assert yaml_message == "suite.yaml: tests[0].vars: Missing variables for the template: name."
    assert card.cases.count() == 0


@pytest.mark.django_db
def test_malformed_files_are_reported_with_line_and_column():
    yaml_message = import_error("prompts:\n  - ok\n tests: [\n")
    json_message = import_error('{"cards": [\n  {"name": "x",}\n]}', filename="cards.json")

    assert yaml_message.startswith("suite.yaml: line 3, column 2: ")
    assert json_message.startswith("cards.json: line 2, column 16: ")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("content", "filename", "expected"),
    [
        (b"prompts: [\xff]", "suite.yaml", "suite.yaml: not UTF-8 text (invalid byte at offset"),
        ("- just\n- a list", "suite.yaml", "suite.yaml: expected a mapping with `cards:`"),
        ("prompts: [x]\ntests: {a: 1}", "suite.yaml", "suite.yaml: tests: must be a list"),
        ("prompts: [x]\ntests: [{vars: [1]}]", "s.yml", "s.yml: tests[0].vars: must be a mapping"),
        (
            '{"cards": [{"name": "x", "prompts": ["y"], "tests": [{"threshold": NaN}]}]}',
            "c.json",
            "c.json: NaN is not JSON",
        ),
        (
            'cards: [{name: x, prompts: [y], tests: [{vars: {a: "\\0"}}]}]',
            "c.yaml",
            "c.yaml: cards[0].tests[0].vars.a: the text has a NUL",
        ),
        (
            "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c]\n"
            "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e]\n"
            "g: [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\n",
            "bomb.yaml",
            "too large or too deeply nested",
        ),
        ("name: x", "notes.txt", "notes.txt: unknown file type"),
        (
            "prompts: [x]\ntests: [{description: a}, {description: a}]",
            "s.yaml",
            "s.yaml: tests[1].description: 'a' is already the name of tests[0]",
        ),
        (
            "cards: [{name: x, prompts: [a, b], tests: [{asserts: []}]}]",
            "s.yaml",
            "s.yaml: cards[0].prompts: a card has exactly one prompt template",
        ),
        (
            "cards: [{name: x, prompts: [y], tests: [{asserts: []}]}]",
            "s.yaml",
            "s.yaml: cards[0].tests[0].asserts: unknown key",
        ),
        (
            '{"cards": [{"name": "x", "prompts": ["y"], "tests": [{"vars": {"a": "\\ud800"}}]}]}',
            "c.json",
            "c.json: cards[0].tests[0].vars.a: the text has a NUL or an unpaired",
        ),
        (
            "prompts: [x]\ntests: [{threshold: " + "9" * 400 + "}]",
            "s.yaml",
            "s.yaml: tests[0].threshold: must be a number",
        ),
        (
            "cards: [{name: A, slug: a, prompts: [x]}, {name: B, slug: a, prompts: [y]}]",
            "s.yaml",
            "s.yaml: cards[1].slug: 'a' is already the slug of cards[0]",
        ),
        (
            "cards: [{name: x, prompts: ['{% if %}']}]",
            "s.yaml",
            "s.yaml: cards[0].prompts[0]: Template error on line 1",
        ),
        ("cards: {name: x}", "s.yaml", "s.yaml: cards: must be a list of cards, got a mapping"),
        (
            "prompts: ['{{ " + "(" * 3000 + "a" + ")" * 3000 + " }}']\ntests: [{}, {}]",
            "s.yaml",
            "s.yaml: prompts[0]: The template is nested too deeply to parse.",
        ),
    ],
)
def test_malformed_input_is_a_card_file_error_naming_the_place(content, filename, expected):
    assert expected in import_error(content, filename=filename)
    assert counts() == (0, 0, 0)


@pytest.mark.django_db
def test_oversized_file_is_refused():
    assert "larger than the limit of 5 MB" in import_error(b"#" * (MAX_BYTES + 1))


@pytest.mark.django_db
def test_csv_without_a_target_card_is_rejected():
    message = import_error("name\nAda\n", filename="cases.csv")

    assert message == "cases.csv: a CSV file holds test cases only; choose their card"


@pytest.mark.django_db
def test_python_assertion_in_csv_is_listed_as_not_imported_naming_row_and_column(make_card):
    card = make_card(slug="greeting", cases=0)
    text = "name,__expected1,__expected2\nAda,javascript: output.length < 9,python: len(output)\n"

    report = import_cards(text, filename="cases.csv", card=card)

    assert card.cases.get().assertions == [{"type": "javascript", "value": "output.length < 9"}]
    assert report.not_imported[0].startswith(
        "cases.csv: row 2, __expected2: python: python assertions run Python code on the server"
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("prompts: ['file://prompts/main.txt']\ntests: []", "prompts[0]: "),
        ("prompts: [{id: 'file://p.txt', label: P}]", "prompts[0].id: "),
        ("prompts: [x]\ntests: file://tests.csv", "tests: "),
        ("prompts: ['{{ doc }}']\ntests: [{vars: {doc: 'file://doc.md'}}]", "tests[0].vars.doc: "),
    ],
)
def test_file_references_are_rejected_naming_the_path(text, where):
    message = import_error(text)

    assert f"suite.yaml: {where}file://" in message
    assert "a single uploaded file has none beside it: import the project's folder" in message
    assert counts() == (0, 0, 0)


@pytest.mark.django_db
def test_import_command_imports_all_files_and_prints_summaries(make_card, tmp_path, capsys):
    card = make_card(
        slug="support", cases=0, template="Customer asks about {{ product }}: {{ question }}"
    )

    call_command("import_cards", str(SUITE), str(DATA / "cases.csv"), "--card", "support")

    out = capsys.readouterr().out
    assert "promptfoo_suite.yaml: cards: 2 created" in out
    assert "cases.csv: cards: 0 created, 0 updated, 1 unchanged; cases: 3 created" in out
    assert card.cases.count() == 3
    assert PromptCard.objects.count() == 3


@pytest.mark.django_db
def test_import_command_with_a_bad_file_imports_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(PROMPTFOO_TESTS)

    with pytest.raises(CommandError) as excinfo:
        call_command("import_cards", str(SUITE), str(bad))

    assert "bad.yaml: tests[2].assert[0]: assertion 1 (regex)" in str(excinfo.value)
    assert counts() == (0, 0, 0)


@pytest.mark.django_db
def test_import_command_names_a_missing_file(tmp_path):
    with pytest.raises(CommandError, match="nope.yaml: cannot be read"):
        call_command("import_cards", str(tmp_path / "nope.yaml"))


@pytest.mark.django_db
def test_export_command_writes_chosen_cards_to_stdout_or_a_file(make_card, tmp_path, capsys):
    make_card(slug="alpha", cases=1)
    make_card(slug="beta", cases=2)

    call_command("export_cards", "beta")
    stdout = capsys.readouterr().out
    call_command("export_cards", "--output", str(tmp_path / "all.json"))
    exported = json.loads((tmp_path / "all.json").read_text())

    assert stdout == export_cards([PromptCard.objects.get(slug="beta")], "yaml")
    assert [card["slug"] for card in exported["cards"]] == ["alpha", "beta"]
    assert len(exported["cards"][1]["tests"]) == 2
    with pytest.raises(CommandError, match="No card with the slug: gamma"):
        call_command("export_cards", "gamma")


@pytest.mark.django_db
def test_csv_header_problems_are_reported_on_row_1(make_card):
    card = make_card(slug="greeting", cases=0)

    message = import_error("name,name,,__prefix\nAda,Ada,,x\n", filename="c.csv", card=card)

    assert message.splitlines() == [
        "c.csv: row 1: column 2 repeats name",
        "c.csv: row 1: column 3 has no name",
    ]


@pytest.mark.django_db
def test_a_card_chosen_for_a_yaml_file_is_refused(make_card):
    card = make_card(slug="greeting", cases=0)

    message = import_error(SUITE.read_text(), card=card)

    assert message == "suite.yaml: this file defines its own cards; import it without a card"


@pytest.mark.django_db
def test_a_single_card_without_the_cards_wrapper_imports(user):
    text = json.dumps(
        {
            "name": "Solo",
            "prompts": ["Hi {{ who }}"],
            "tests": [{"description": "one", "vars": {"who": "Ada"}}],
        }
    )

    report = import_text(text, filename="solo.json", user=user)

    card = PromptCard.objects.get(slug="solo")
    assert (report.cards_created, report.cases_created) == (1, 1)
    assert (card.name, card.template, card.owner) == ("Solo", "Hi {{ who }}", user)
