"""The assertions module: every type on realistic outputs, negation, weighting, the rubric
grader's answers, save-time validation, and properties that hold for any input."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from testruns.catalog.assertions import (
    ASSERTION_TYPES,
    AssertionOutcome,
    assertion_errors,
    check_assertion,
    evaluate,
    parse_grade,
    rubric_prompt,
)

ORDER_JSON = json.dumps(
    {"order": {"id": "A-17", "items": [{"name": "apple", "qty": 2}, {"name": "pear", "qty": 1}]}}
)
ORDER_SCHEMA = {
    "type": "object",
    "required": ["qty", "fruit"],
    "properties": {"qty": {"type": "integer", "minimum": 1}, "fruit": {"type": "string"}},
}


# -- Every type passes and fails on realistic outputs ---------------------------------------


@pytest.mark.parametrize(
    ("spec", "output", "passed"),
    [
        ({"type": "equals", "value": "42"}, "42", True),
        ({"type": "equals", "value": "42"}, "42\n", False),
        (
            {"type": "equals", "value": {"qty": 2, "tags": ["a"]}},
            '{"tags": ["a"], "qty": 2.0}',
            True,
        ),
        ({"type": "equals", "value": {"ok": 1}}, '{"ok": true}', False),
        ({"type": "equals", "value": [1, 2]}, "1, 2", False),
        ({"type": "contains", "value": "refund"}, "You can request a refund within 30 days.", True),
        (
            {"type": "contains", "value": "Refund"},
            "You can request a refund within 30 days.",
            False,
        ),
        ({"type": "icontains", "value": "widget pro"}, "The WIDGET Pro ships today.", True),
        ({"type": "icontains", "value": "gadget"}, "The Widget Pro ships today.", False),
        ({"type": "contains-any", "value": ["warranty", "guarantee"]}, "A 2-year guarantee.", True),
        ({"type": "contains-any", "value": ["warranty", "guarantee"]}, "No returns, sorry.", False),
        ({"type": "contains-all", "value": ["name", "email"]}, "Send your name and email.", True),
        ({"type": "contains-all", "value": ["name", "email"]}, "Send your name.", False),
        ({"type": "starts-with", "value": "Dear"}, "Dear customer, thank you.", True),
        ({"type": "starts-with", "value": "Dear"}, "Hello, dear customer.", False),
        ({"type": "regex", "value": r"^\d{3}-\d{4}$"}, "555-1234", True),
        ({"type": "regex", "value": r"^\d{3}-\d{4}$"}, "Call 555-1234", False),
        ({"type": "regex", "value": r"(?i)order #\d+"}, "Your ORDER #881 shipped", True),
        ({"type": "is-json"}, '{"qty": 2, "fruit": "apple"}', True),
        ({"type": "is-json"}, '```json\n{"qty": 2}\n```', False),
        ({"type": "is-json"}, "NaN", False),
        ({"type": "is-json", "value": ORDER_SCHEMA}, '{"qty": 2, "fruit": "apple"}', True),
        ({"type": "is-json", "value": ORDER_SCHEMA}, '{"qty": 0, "fruit": "apple"}', False),
        ({"type": "json-schema", "value": ORDER_SCHEMA}, '{"qty": 3, "fruit": "pear"}', True),
        ({"type": "json-schema", "value": ORDER_SCHEMA}, '{"qty": "two", "fruit": "pear"}', False),
        ({"type": "json-schema", "value": ORDER_SCHEMA}, "three pears", False),
        (
            {"type": "json-path", "value": {"path": "$.order.items[0].name", "equals": "apple"}},
            ORDER_JSON,
            True,
        ),
        (
            {"type": "json-path", "value": {"path": "order.items.1.qty", "equals": 1}},
            ORDER_JSON,
            True,
        ),
        (
            {"type": "json-path", "value": {"path": "$['order']['id']", "equals": "A-17"}},
            ORDER_JSON,
            True,
        ),
        (
            {
                "type": "json-path",
                "value": {"path": "$.order.items[-1]", "equals": {"name": "pear", "qty": 1}},
            },
            ORDER_JSON,
            True,
        ),
        (
            {"type": "json-path", "value": {"path": "$.order.items[0].qty", "equals": 3}},
            ORDER_JSON,
            False,
        ),
        (
            {"type": "json-path", "value": {"path": "$.order.items[5]", "equals": None}},
            ORDER_JSON,
            False,
        ),
        ({"type": "json-path", "value": {"path": "$.order", "equals": 1}}, "not json", False),
        (
            {"type": "levenshtein", "value": {"expected": "Thank you for your order", "max": 2}},
            "Thank you for you order",
            True,
        ),
        (
            {"type": "levenshtein", "value": {"expected": "Thank you for your order", "max": 2}},
            "Thanks a lot",
            False,
        ),
        ({"type": "word-count", "value": {"min": 3, "max": 5}}, "One short summary here.", True),
        ({"type": "word-count", "value": {"min": 3, "max": 5}}, "Too short.", False),
        ({"type": "word-count", "value": {"max": 3}}, "This summary is far too long.", False),
        ({"type": "word-count", "value": {"min": 2}}, "  two\n words ", True),
    ],
    ids=lambda param: (
        param["type"]
        if isinstance(param, dict)
        else "passes"
        if param is True
        else "fails"
        if param is False
        else "output"
    ),
)
def test_each_type_passes_on_a_matching_output_and_fails_otherwise(spec, output, passed):
    outcome = check_assertion(spec, output=output)

    assert outcome.passed is passed, outcome.reason
    assert outcome.type == spec["type"]
    if spec["type"] != "levenshtein":  # the only type here with a graded score
        assert outcome.score == float(passed)


@pytest.mark.parametrize(
    ("value", "latency_ms", "passed"),
    [(1000, 532.4, True), (1000, 1000, True), (1000, 1532.0, False), (1000, None, False)],
)
def test_latency_passes_within_the_limit_and_fails_over_it_or_unmeasured(value, latency_ms, passed):
    outcome = check_assertion({"type": "latency", "value": value}, output="", latency_ms=latency_ms)

    assert outcome.passed is passed
    if latency_ms is None:
        assert "not measured" in outcome.reason


@pytest.mark.parametrize(
    ("value", "cost", "passed"),
    [
        (0.01, Decimal("0.0042"), True),
        (0.01, Decimal("0.01"), True),  # a float limit of 0.01 is exactly one cent
        (0.01, 0.0123, False),
        (0, Decimal("0.000001"), False),
        (0.01, None, False),
    ],
)
def test_cost_passes_within_the_limit_and_fails_over_it_or_unmeasured(value, cost, passed):
    outcome = check_assertion({"type": "cost", "value": value}, output="", cost=cost)

    assert outcome.passed is passed, outcome.reason


def test_failure_reasons_say_what_was_expected_and_what_was_seen():
    outcome = check_assertion({"type": "contains", "value": "refund"}, output="We ship on Monday.")

    assert outcome.reason == 'output does not contain "refund"; output: "We ship on Monday."'


def test_reasons_truncate_long_outputs():
    output = "word " * 2000

    outcome = check_assertion({"type": "contains", "value": "refund"}, output=output)

    assert len(outcome.reason) < 200
    assert "(10000 chars)" in outcome.reason


def test_schema_failure_reason_points_at_the_offending_field():
    outcome = check_assertion(
        {"type": "json-schema", "value": ORDER_SCHEMA}, output='{"qty": "two", "fruit": "pear"}'
    )

    assert outcome.reason == (
        "output JSON does not match the schema at $.qty: 'two' is not of type 'integer'"
    )


def test_schema_with_an_unresolvable_ref_fails_without_fetching_it():
    spec = {"type": "json-schema", "value": {"$ref": "https://example.com/order.json"}}
    assert assertion_errors([spec]) == []

    outcome = check_assertion(spec, output="{}")

    assert not outcome.passed
    assert outcome.reason.startswith("the schema could not be applied")


def test_deeply_nested_output_is_a_failure_not_a_crash():
    outcome = check_assertion({"type": "is-json"}, output="[" * 100_000)

    assert not outcome.passed
    assert outcome.reason.startswith("output is not valid JSON")


def test_levenshtein_score_is_one_minus_distance_over_the_longer_length():
    spec = {"type": "levenshtein", "value": {"expected": "kitten", "max": 3}}

    outcome = check_assertion(spec, output="sitting")

    assert outcome.passed
    assert outcome.score == pytest.approx(1 - 3 / 7)
    assert "edit distance" in outcome.reason and "3" in outcome.reason


def test_levenshtein_of_two_empty_strings_is_a_perfect_match():
    outcome = check_assertion(
        {"type": "levenshtein", "value": {"expected": "", "max": 0}}, output=""
    )

    assert outcome.passed and outcome.score == 1.0


# -- Negation --------------------------------------------------------------------------------


NEGATION_CASES = [
    ({"type": "equals", "value": "yes"}, "yes"),
    ({"type": "contains", "value": "sorry"}, "We are sorry for the delay."),
    ({"type": "icontains", "value": "SORRY"}, "We are sorry for the delay."),
    ({"type": "contains-any", "value": ["sorry", "apolog"]}, "We apologise."),
    ({"type": "contains-all", "value": ["order", "shipped"]}, "Your order has shipped."),
    ({"type": "starts-with", "value": "As an AI"}, "As an AI, I cannot."),
    ({"type": "regex", "value": r"\bI cannot\b"}, "As an AI, I cannot."),
    ({"type": "is-json"}, "[1, 2, 3]"),
    ({"type": "icontains-any", "value": ["SORRY", "apolog"]}, "We apologise."),
    ({"type": "icontains-all", "value": ["ORDER", "shipped"]}, "Your order has shipped."),
    ({"type": "contains-json"}, 'Here: {"status": "ok"} as asked.'),
    ({"type": "javascript", "value": "output.includes('cannot')"}, "As an AI, I cannot."),
    ({"type": "rouge-n", "value": "your order has shipped"}, "Your order has shipped"),
    ({"type": "bleu", "value": "your order has shipped today"}, "Your order has shipped today"),
]


@pytest.mark.parametrize(("spec", "matching_output"), NEGATION_CASES)
def test_not_prefix_inverts_the_base_result(spec, matching_output):
    negated = {**spec, "type": "not-" + spec["type"]}

    on_match = check_assertion(negated, output=matching_output)
    on_other = check_assertion(negated, output="Something else entirely.")

    assert check_assertion(spec, output=matching_output).passed
    assert not on_match.passed and on_match.score == 0.0
    assert on_match.reason.startswith("expected the opposite: ")
    assert on_other.passed and on_other.score == pytest.approx(1.0)  # BLEU smooths zeros
    assert on_match.type == negated["type"]


def test_not_variants_exist_for_exactly_the_deterministic_text_types():
    negatable = {spec["type"] for spec, _ in NEGATION_CASES}

    # similar too (it needs embeddings: tests/test_promptfoo_assertions.py inverts it).
    assert {name for name in ASSERTION_TYPES if name.startswith("not-")} == {
        "not-" + name for name in negatable | {"similar"}
    }
    assert ASSERTION_TYPES >= {
        "json-schema",
        "json-path",
        "levenshtein",
        "word-count",
        "latency",
        "cost",
        "llm-rubric",
    }


def test_negating_a_malformed_spec_still_fails():
    outcome = check_assertion({"type": "not-regex", "value": "["}, output="anything")

    assert not outcome.passed
    assert "invalid regular expression" in outcome.reason


# -- Weights and thresholds ------------------------------------------------------------------


def test_evaluate_passes_only_when_every_assertion_passes_without_a_threshold():
    specs = [{"type": "contains", "value": "refund"}, {"type": "contains", "value": "30 days"}]

    assert evaluate(specs, output="A refund within 30 days.").passed
    assert not evaluate(specs, output="A refund is possible.").passed


def test_evaluate_score_is_the_weighted_mean_of_outcome_scores():
    specs = [
        {"type": "contains", "value": "refund", "weight": 3},
        {"type": "contains", "value": "missing"},
    ]

    verdict = evaluate(specs, output="Your refund is on its way.")

    assert verdict.score == pytest.approx(0.75)
    assert [outcome.weight for outcome in verdict.outcomes] == [3.0, 1.0]
    assert not verdict.passed


@pytest.mark.parametrize(("threshold", "passed"), [(0.75, True), (0.5, True), (0.76, False)])
def test_evaluate_with_a_threshold_passes_when_the_weighted_score_reaches_it(threshold, passed):
    specs = [
        {"type": "contains", "value": "refund", "weight": 3},
        {"type": "contains", "value": "missing"},
    ]

    verdict = evaluate(specs, output="Your refund is on its way.", threshold=threshold)

    assert verdict.passed is passed


def test_threshold_at_an_exact_fraction_passes_despite_float_rounding():
    # 0.1 + 0.7 over 1.0 is 0.7999999999999999 in floating point.
    weights = {"a": 0.1, "b": 0.7, "z": 0.2}
    specs = [{"type": "contains", "value": word, "weight": w} for word, w in weights.items()]

    verdict = evaluate(specs, output="a b", threshold=0.8)

    assert verdict.score < 0.8 and verdict.passed


def test_evaluate_without_assertions_passes_with_a_full_score():
    verdict = evaluate([], output="anything")

    assert verdict.passed and verdict.score == 1.0 and verdict.outcomes == []


def test_evaluate_passes_latency_and_cost_through_to_the_checks():
    specs = [{"type": "latency", "value": 500}, {"type": "cost", "value": 0.002}]

    verdict = evaluate(specs, output="", latency_ms=420, cost=Decimal("0.0019"))

    assert verdict.passed, [outcome.reason for outcome in verdict.outcomes]


def test_outcomes_serialise_to_json():
    verdict = evaluate([{"type": "contains", "value": "x", "weight": 2}], output="y")

    assert json.loads(json.dumps(verdict.outcomes[0].as_dict())) == {
        "type": "contains",
        "passed": False,
        "score": 0.0,
        "reason": 'output does not contain "x"; output: "y"',
        "weight": 2.0,
    }


# -- llm-rubric ------------------------------------------------------------------------------


RUBRIC = {"type": "llm-rubric", "value": "Is polite and names the product."}


def test_llm_rubric_sends_rubric_and_output_to_the_grader_and_passes_on_a_json_pass():
    prompts = []

    def grade(prompt: str) -> str:
        prompts.append(prompt)
        return '{"pass": true, "reason": "Polite and mentions Widget Pro."}'

    outcome = check_assertion(RUBRIC, output="Thanks! Widget Pro ships today.", grade=grade)

    assert outcome.passed and outcome.score == 1.0
    assert outcome.reason == "grader: Polite and mentions Widget Pro."
    assert prompts == [rubric_prompt(RUBRIC["value"], "Thanks! Widget Pro ships today.")]
    assert "Is polite and names the product." in prompts[0]
    assert "Thanks! Widget Pro ships today." in prompts[0]
    assert '"pass"' in prompts[0]


def test_llm_rubric_fails_on_a_fenced_json_fail():
    answer = 'Here is my verdict:\n```json\n{"pass": false, "reason": "Rude tone."}\n```'

    outcome = check_assertion(RUBRIC, output="Whatever.", grade=lambda prompt: answer)

    assert not outcome.passed
    assert outcome.reason == "grader: Rude tone."


def test_llm_rubric_fails_when_the_grader_answer_is_garbage():
    outcome = check_assertion(RUBRIC, output="Hi", grade=lambda prompt: "¯\\_(ツ)_/¯ maybe?")

    assert not outcome.passed
    assert "grader answer could not be read" in outcome.reason


def test_llm_rubric_fails_with_the_error_when_the_grader_raises():
    def grade(prompt: str) -> str:
        raise TimeoutError("grader timed out after 30s")

    outcome = check_assertion(RUBRIC, output="Hi", grade=grade)

    assert not outcome.passed
    assert outcome.reason == "grader call failed: TimeoutError: grader timed out after 30s"


def test_llm_rubric_fails_clearly_without_a_grader():
    outcome = check_assertion(RUBRIC, output="Hi", grade=None)

    assert not outcome.passed
    assert outcome.reason == "no grader provider configured"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('{"pass": true, "reason": "ok"}', (True, "ok")),
        ('Sure. {"pass": false, "reason": "too long"} Hope that helps!', (False, "too long")),
        ('```json\n{"reason": "fine", "pass": "true"}\n```', (True, "fine")),
        ('{"pass": true}', (True, "no reason")),
        ("PASS: the answer is polite.", (True, "the answer is polite.")),
        ("**FAIL** - it never names the product", (False, "it never names the product")),
        (
            "Passing this one would be wrong.",
            (False, 'grader answer could not be read: "Passing this one would be wrong."'),
        ),
        (
            '{"pass": null, "reason": "unsure"}',
            (
                False,
                'grader answer could not be read: "{\\"pass\\": null, \\"reason\\": \\"unsure\\"}"',
            ),
        ),
        ("", (False, 'grader answer could not be read: ""')),
    ],
)
def test_parse_grade_reads_json_anywhere_then_a_leading_word_else_fails(answer, expected):
    assert parse_grade(answer) == expected


# -- Validation at save time -----------------------------------------------------------------


def test_valid_assertions_have_no_errors():
    assertions = [
        {"type": "equals", "value": {"qty": 2}},
        {"type": "contains", "value": "refund", "weight": 2},
        {"type": "not-icontains", "value": "as an ai"},
        {"type": "contains-any", "value": ["warranty", "guarantee"]},
        {"type": "regex", "value": r"^\d+$", "weight": 0.5},
        {"type": "is-json"},
        {"type": "is-json", "value": ORDER_SCHEMA},
        {"type": "json-schema", "value": ORDER_SCHEMA},
        {"type": "json-path", "value": {"path": "$.order.items[0]['name']", "equals": "apple"}},
        {"type": "levenshtein", "value": {"expected": "hello", "max": 2}},
        {"type": "word-count", "value": {"max": 40}},
        {"type": "latency", "value": 1500},
        {"type": "cost", "value": 0.002},
        {"type": "llm-rubric", "value": "Is polite."},
    ]

    assert assertion_errors(assertions) == []


@pytest.mark.parametrize(
    ("assertions", "errors"),
    [
        (None, ["assertions must be a list, got null"]),
        ("contains refund", ["assertions must be a list, got string"]),
        ({"type": "contains", "value": "x"}, ["assertions must be a list, got object"]),
        (
            [{"type": "contains", "value": "x"}, "regex"],
            ["assertion 2: must be an object, got string"],
        ),
        ([{"value": "x"}], ['assertion 1: "type" is missing']),
        ([{"type": 3}], ['assertion 1: "type" must be a string, got number']),
        ([{"type": "contains"}], ["assertion 1 (contains): value is required"]),
        (
            [{"type": "contains", "value": 5}],
            ["assertion 1 (contains): value must be a string, got number"],
        ),
        (
            [{"type": "contains", "value": "  "}],
            ["assertion 1 (contains): value must not be blank"],
        ),
        (
            [{"type": "equals", "value": 42}],
            ["assertion 1 (equals): value must be a string, object or array, got number"],
        ),
        (
            [{"type": "contains-any", "value": "warranty"}],
            [
                "assertion 1 (contains-any): value must be a non-empty array of strings, "
                'got string "warranty"'
            ],
        ),
        (
            [{"type": "contains-all", "value": ["name", 7]}],
            ["assertion 1 (contains-all): value[1] must be a non-blank string, got number 7"],
        ),
        (
            [{"type": "regex", "value": "x"}, {"type": "regex", "value": "["}],
            [
                "assertion 2 (regex): invalid regular expression: unterminated character set at "
                "position 0"
            ],
        ),
        (
            [{"type": "json-schema", "value": {"type": "strin"}}],
            [
                "assertion 1 (json-schema): value is not a valid JSON schema: 'strin' is not valid "
                "under any of the given schemas (at $.type)"
            ],
        ),
        (
            [{"type": "is-json", "value": 12}],
            [
                "assertion 1 (is-json): value is not a valid JSON schema: 12 is not of type "
                "'object', 'boolean'"
            ],
        ),
        (
            [{"type": "json-schema"}],
            ["assertion 1 (json-schema): value is required (a JSON schema)"],
        ),
        (
            [{"type": "json-path", "value": "$.a"}],
            ['assertion 1 (json-path): value must be an object with "equals", "path", got string'],
        ),
        (
            [{"type": "json-path", "value": {"path": "$.a"}}],
            ['assertion 1 (json-path): value is missing "equals"'],
        ),
        (
            [{"type": "json-path", "value": {"path": "$..a", "equals": 1}}],
            ['assertion 1 (json-path): invalid path "$..a": unsupported syntax at "..a"'],
        ),
        (
            [{"type": "json-path", "value": {"path": "$.items[*]", "equals": 1}}],
            ['assertion 1 (json-path): invalid path "$.items[*]": unsupported syntax at "[*]"'],
        ),
        (
            [{"type": "levenshtein", "value": {"expected": "hi", "max": -1}}],
            [
                'assertion 1 (levenshtein): value "max" must be a whole number '
                "from 0 to 1000000000, got number -1"
            ],
        ),
        (
            [{"type": "levenshtein", "value": {"expected": 3, "max": 2, "min": 1}}],
            ['assertion 1 (levenshtein): value has unknown key "min"'],
        ),
        (
            [{"type": "word-count", "value": {}}],
            ['assertion 1 (word-count): value needs "min", "max" or both'],
        ),
        (
            [{"type": "word-count", "value": {"min": 5, "max": 2}}],
            ['assertion 1 (word-count): value "min" (5) is more than "max" (2)'],
        ),
        (
            [{"type": "word-count", "value": {"min": 2.5}}],
            [
                'assertion 1 (word-count): value "min" must be a whole number '
                "from 0 to 1000000000, got number 2.5"
            ],
        ),
        (
            [{"type": "latency", "value": -1}],
            ["assertion 1 (latency): value must be a number >= 0, got number -1"],
        ),
        (
            [{"type": "cost", "value": "cheap"}],
            ['assertion 1 (cost): value must be a number >= 0, got string "cheap"'],
        ),
        ([{"type": "cost"}], ["assertion 1 (cost): value is required (a number >= 0)"]),
        (
            [{"type": "llm-rubric", "value": ""}],
            ["assertion 1 (llm-rubric): value must not be blank"],
        ),
        (
            [{"type": "contains", "value": "x", "weight": 0}],
            ["assertion 1 (contains): weight must be a positive number, got number 0"],
        ),
        (
            [{"type": "contains", "value": "x", "weight": "2"}],
            ['assertion 1 (contains): weight must be a positive number, got string "2"'],
        ),
        (
            [{"type": "contains", "value": "x", "weight": True}],
            ["assertion 1 (contains): weight must be a positive number, got boolean true"],
        ),
        (
            [{"type": "contains", "valeu": "x"}],
            [
                'assertion 1 (contains): unknown key "valeu"',
                "assertion 1 (contains): value is required",
            ],
        ),
    ],
)
def test_assertion_errors_names_position_type_and_problem(assertions, errors):
    assert assertion_errors(assertions) == errors


def test_a_misspelt_type_gets_the_near_one_and_a_stranger_the_accepted_types():
    (near,) = assertion_errors([{"type": "containz", "value": "x"}])
    (far,) = assertion_errors([{"type": "zzqqxx", "value": "x"}])

    assert near == 'assertion 1: unknown type "containz"; did you mean "contains"?'
    assert far.startswith(
        'assertion 1: unknown type "zzqqxx"; expected one of: answer-relevance, bleu, contains, '
    )
    assert all(name in far for name in ASSERTION_TYPES)


def test_not_variants_of_budgets_are_unknown_types():
    (error,) = assertion_errors([{"type": "not-latency", "value": 100}])

    assert error.startswith('assertion 1: unknown type "not-latency"')


def test_every_problem_in_a_list_is_reported():
    errors = assertion_errors(
        [{"type": "contains", "value": "ok"}, {"type": "regex", "value": "("}, 3, {"type": "x"}]
    )

    assert [error.split(":")[0] for error in errors] == [
        "assertion 2 (regex)",
        "assertion 3",
        "assertion 4",
    ]


def test_check_assertion_turns_a_malformed_spec_into_a_failed_outcome():
    outcome = check_assertion({"type": "word-count", "value": "short", "weight": -2}, output="x")

    assert outcome == AssertionOutcome(
        type="word-count",
        passed=False,
        score=0.0,
        reason='invalid assertion: value must be an object with "max", "min", got string; '
        "weight must be a positive number, got number -2",
        weight=1.0,
    )


# -- Properties ------------------------------------------------------------------------------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
schemas = st.booleans() | st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["object", "array", "string", "integer", "null", "strin"]),
        "required": st.lists(st.text(max_size=5), max_size=3),
        "minLength": st.integers(-1, 5),
        "items": st.just({"type": "integer"}),
        "$ref": st.sampled_from(["#", "#/$defs/missing", "https://example.com/x.json"]),
    },
)
values_by_type = {
    "equals": st.text() | json_values,
    "contains": st.text(),
    "icontains": st.text(),
    "starts-with": st.text(),
    "llm-rubric": st.text(),
    "contains-any": st.lists(st.text(), max_size=3),
    "contains-all": st.lists(st.text(), max_size=3),
    "regex": st.text(max_size=10) | st.sampled_from([r"^\d+$", r"(?i)yes|no", r"\bword\b", "["]),
    "is-json": st.none() | schemas,
    "json-schema": schemas,
    "json-path": st.fixed_dictionaries(
        {
            "path": st.text(max_size=10)
            | st.sampled_from(["$", "$.a", "a.0", "$['a'][0]", "$.a[-1]", "0", "$[0].b"]),
            "equals": json_values,
        }
    ),
    "levenshtein": st.fixed_dictionaries(
        {"expected": st.text(max_size=30), "max": st.integers(-1, 10)}
    ),
    "word-count": st.fixed_dictionaries(
        {}, optional={"min": st.integers(-1, 10), "max": st.integers(-1, 10)}
    ),
    "latency": st.integers(-5, 5000) | st.floats(),
    "cost": st.integers(-1, 5) | st.floats(),
    "icontains-any": st.lists(st.text(), max_size=3),
    "icontains-all": st.lists(st.text(), max_size=3),
    "contains-json": st.none() | schemas,
    "is-valid-openai-tools-call": json_values,
    "javascript": st.text(max_size=12)
    | st.sampled_from(["output.length", "true", "({pass: true})", "JSON.parse(output)", "x("]),
    "rouge-n": st.text(),
    "bleu": st.text() | st.lists(st.text(), max_size=2),
    "similar": st.text(),
    "factuality": st.text(),
    "model-graded-closedqa": st.text(),
    "g-eval": st.text(),
    "answer-relevance": json_values,
}


@st.composite
def specs(draw) -> dict:
    name = draw(st.sampled_from(sorted(ASSERTION_TYPES)))
    value = draw(values_by_type[name.removeprefix("not-")] | json_values)
    spec = {"type": name, "value": value}
    if draw(st.booleans()):
        spec["weight"] = draw(st.floats(0.1, 10) | json_values)
    return spec


def _raising_grader(prompt: str) -> str:
    raise RuntimeError("provider unavailable")


graders = st.none() | st.just(_raising_grader) | st.text().map(lambda answer: lambda _: answer)
outputs = st.text() | json_values.map(json.dumps)


@settings(deadline=None, max_examples=300)
@given(st.lists(json_values | specs(), max_size=4) | json_values, outputs)
def test_validation_and_checks_never_raise_on_arbitrary_input(assertions, output):
    errors = assertion_errors(assertions)

    assert isinstance(errors, list) and all(isinstance(error, str) for error in errors)
    for spec in assertions if isinstance(assertions, list) else []:
        outcome = check_assertion(spec, output=output)
        if assertion_errors([spec]):
            assert not outcome.passed and outcome.reason.startswith("invalid assertion: ")


@settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.filter_too_much])
@given(specs(), outputs, graders, st.none() | st.floats(0, 10_000), st.none() | st.floats(0, 1))
def test_check_assertion_never_raises_on_a_valid_spec(spec, output, grade, latency_ms, cost):
    assume(assertion_errors([spec]) == [])

    outcome = check_assertion(spec, output=output, latency_ms=latency_ms, cost=cost, grade=grade)

    assert 0.0 <= outcome.score <= 1.0
    assert outcome.type == spec["type"] and outcome.weight > 0
    assert outcome.reason
    json.dumps(outcome.as_dict())


@given(st.text())
def test_parse_grade_never_raises(answer):
    passed, reason = parse_grade(answer)

    assert isinstance(passed, bool) and isinstance(reason, str)


@pytest.mark.parametrize("kind", ["json-schema", "contains-json"])
@pytest.mark.parametrize(
    "schema",
    [{"$ref": "#/$defs/missing"}, {"$ref": "#"}],
    ids=["a-ref-to-nowhere", "a-ref-to-itself"],
)
def test_a_schema_that_cannot_be_applied_fails_the_assertion_and_says_why(kind, schema):
    # Found by hypothesis: valid as a schema, yet it cannot be applied to a document.
    assert assertion_errors([{"type": kind, "value": schema}]) == []

    outcome = check_assertion({"type": kind, "value": schema}, output='{"a": 1}')

    assert not outcome.passed
    assert outcome.reason.startswith("the schema could not be applied: ")
