"""The assertion types promptfoo users rely on: javascript and transforms in the V8 sandbox
(and a real worker that survives what the sandbox refuses), the text and JSON types, scores,
embeddings through the fake vendor's /v1/embeddings, and the model-graded types."""

from __future__ import annotations

import json
import threading

import psutil
import pytest

from testruns.catalog.assertions import assertion_errors, check_assertion, sandbox
from testruns.engine import launching
from testruns.models import PromptCard, Provider, TestCase, TestResult, TestRun
from tests.conftest import run_in_this_thread, wait_for

ENDLESS = "let n = 0;\nwhile (true) { n++; }"
HUGE = "const chunks = [];\nwhile (true) { chunks.push(new Array(1e6).fill(n => n)); }"
ABORTS_V8 = "new Array(2 ** 30).fill(0).length > 0"
# Typed arrays live outside V8's heap, beyond its own limit: the helper's memory cap stops them.
BUFFERS = "const chunks = [];\nwhile (true) { chunks.push(new Uint8Array(1 << 26).fill(1)); }"


def reason(spec: dict, output: str = "Paris is sunny", **kwargs) -> str:
    return check_assertion(spec, output=output, **kwargs).reason


def test_javascript_expressions_bodies_scores_and_results():
    js = {"type": "javascript"}
    assert check_assertion({**js, "value": "output.includes('Paris')"}, output="Paris").passed
    context = check_assertion(
        {**js, "value": "output.includes(context.vars.city)"},
        output="Oslo in May",
        variables={"city": "Oslo"},
    )
    assert context.passed
    body = {
        **js,
        "value": "const n = output.length;\nreturn {pass: n > 3, score: 0.25, reason: 'n=' + n};",
    }
    outcome = check_assertion(body, output="abcd")
    assert (outcome.passed, outcome.score, outcome.reason) == (True, 0.25, "n=4")
    scored = {**js, "value": "output.length / 10", "threshold": 0.5}
    assert not check_assertion(scored, output="abc").passed
    assert check_assertion(scored, output="abcdef").passed
    declared = {**js, "value": "const words = output.split(' '); words.length === 2"}
    assert check_assertion(declared, output="two words").passed


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("require('fs').readFileSync('/etc/passwd')", "require is not available in this sandbox"),
        ("process.mainModule.require('child_process')", "process.mainModule is not available"),
        ("fetch('http://127.0.0.1:1/')", "fetch is not available in this sandbox"),
        ("process.exit(1)", "process.exit is not available"),
        (ENDLESS, "the code ran longer than the time limit of 1000 ms; it was stopped"),
        (HUGE, "the code used more than the memory limit of 64 MB"),
        (BUFFERS, "RangeError: Array buffer allocation failed"),
        ("Promise.resolve(true)", "the code returned a Promise"),
        ("'text'", "must return a boolean, a number or {pass, score, reason}"),
    ],
)
def test_the_sandbox_refuses_and_says_why(code, expected):
    outcome = check_assertion({"type": "javascript", "value": code}, output="x")

    assert not outcome.passed
    assert expected in outcome.reason


def test_a_crash_of_v8_itself_is_a_failed_assertion_and_the_next_call_works():
    crashed = check_assertion({"type": "javascript", "value": ABORTS_V8}, output="x")

    assert not crashed.passed
    assert "memory" in crashed.reason or "time limit" in crashed.reason
    assert check_assertion({"type": "javascript", "value": "true"}, output="x").passed


def test_a_helper_killed_mid_call_fails_that_assertion_and_the_next_call_gets_a_new_one(
    monkeypatch,
):
    monkeypatch.setattr(sandbox, "TIME_LIMIT_MS", 20_000)  # killed long before its limit
    outcome: list = []
    call = threading.Thread(
        target=lambda: outcome.append(
            check_assertion({"type": "javascript", "value": ENDLESS}, output="x")
        )
    )
    call.start()

    def busy_helper() -> list[psutil.Process]:
        """The helper taken for the call: a sandbox process that is no longer idle."""
        idle = {helper.process.pid for helper in sandbox._idle}
        return [
            child
            for child in psutil.Process().children()
            if child.pid not in idle and "sandbox_child.py" in " ".join(child.cmdline())
        ]

    wait_for(busy_helper, what="the helper running the call")[0].kill()  # as the OOM killer
    call.join(timeout=30)

    assert not outcome[0].passed
    assert "the JavaScript sandbox stopped unexpectedly" in outcome[0].reason
    assert check_assertion({"type": "javascript", "value": "true"}, output="x").passed


def test_code_that_does_not_compile_and_python_are_refused_when_saved():
    errors = assertion_errors(
        [
            {"type": "javascript", "value": "output.includes("},
            {"type": "contains", "value": "a", "transform": "output.("},
            {"type": "python", "value": "output == 'x'"},
            {"type": "rouge-n", "value": "x", "threshold": "high"},
        ]
    )

    assert errors[0].startswith("assertion 1 (javascript): value does not compile: SyntaxError")
    assert errors[1].startswith("assertion 2 (contains): transform does not compile: SyntaxError")
    assert errors[2].startswith("assertion 3: python is not supported: python assertions run")
    assert errors[3] == 'assertion 4 (rouge-n): threshold must be a number >= 0, got string "high"'


def test_transforms_run_in_turn_and_hand_data_to_javascript():
    spec = {
        "type": "javascript",
        "value": "output.total === 3",
        "transform": ["JSON.parse(output)"],
    }
    assert check_assertion(spec, output='{"total": 3}').passed
    chained = {
        "type": "equals",
        "value": "AB",
        "transform": ["output.trim()", "output.toUpperCase()"],
    }
    assert check_assertion(chained, output="  ab ").passed
    broken = check_assertion(
        {"type": "contains", "value": "a", "transform": "JSON.parse(output)"}, output="{"
    )
    assert not broken.passed and broken.reason.startswith("transform: SyntaxError")


def test_text_json_and_tool_call_types():
    assert check_assertion(
        {"type": "icontains-all", "value": ["PARIS", "sun"]}, output="paris SUN"
    ).passed
    assert not check_assertion({"type": "icontains-any", "value": ["rome"]}, output="Paris").passed
    schema = {"type": "object", "required": ["city"]}
    assert check_assertion(
        {"type": "contains-json", "value": schema}, output='ok {"city": "Oslo"} ok'
    ).passed
    assert not check_assertion(
        {"type": "contains-json", "value": schema}, output='{"town": 1}'
    ).passed
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    call = [{"function": {"name": "weather", "arguments": json.dumps({"city": "Oslo"})}}]
    bad = [{"function": {"name": "weather", "arguments": "{}"}}]
    spec = {"type": "is-valid-openai-tools-call", "value": tools}
    assert check_assertion(spec, output=json.dumps({"tool_calls": call})).passed
    assert "'city' is a required property" in reason(spec, json.dumps(bad))


def test_rouge_and_bleu_score_like_promptfoo():
    rouge = check_assertion(
        {"type": "rouge-n", "value": "The cat sat on the mat."}, output="the cat sat on the mat"
    )
    assert rouge.passed and rouge.score == pytest.approx(12 / 13)
    bleu = check_assertion(
        {"type": "bleu", "value": "the cat sat on the mat"}, output="the cat sat on a mat"
    )
    assert bleu.passed and bleu.score == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_model_graded_types_ask_the_grader_with_promptfoo_prompts():
    asked = []

    def grader(answer: str):
        def grade(prompt: str) -> str:
            asked.append(prompt)
            return answer

        return grade

    factuality = {"type": "factuality", "value": "Paris is the capital of France"}
    assert check_assertion(
        factuality, output="Paris", grade=grader('{"category": "A", "reason": "subset"}')
    ).passed
    assert not check_assertion(factuality, output="Lyon", grade=grader('{"category": "D"}')).passed
    assert "<expert_answer>\nParis is the capital of France\n</expert_answer>" in asked[0]
    closed = {"type": "model-graded-closedqa", "value": "names a city"}
    assert check_assertion(closed, output="Paris", grade=grader("Reasoning...\nY\nY")).passed
    g_eval = check_assertion(
        {"type": "g-eval", "value": "coherent"},
        output="Paris",
        grade=lambda p: (
            '{"steps": ["read it"]}'
            if "EVALUATION CRITERIA" in p
            else '{"score": 8, "reason": "ok"}'
        ),
    )
    assert g_eval.passed and g_eval.score == pytest.approx(0.8)


@pytest.fixture
def fake_openai(fake_llm, db):
    return Provider.objects.create(
        name="Fake OpenAI",
        kind="openai",
        model="fake-1",
        base_url=fake_llm.base_url,
        timeout_seconds=10,
    )


@pytest.mark.django_db(transaction=True)
def test_similar_and_answer_relevance_use_embeddings_of_the_grader_provider(
    fake_llm, fake_openai, make_card
):
    card = make_card(slug="embed", cases=0, template="Weather in {{ city }}?", system_prompt="")
    TestCase.objects.create(
        card=card,
        name="close",
        variables={"city": "Paris"},
        assertions=[
            {"type": "similar", "value": "echo: weather in Paris", "threshold": 0.9},
            {"type": "not-similar", "value": "completely unrelated words"},
            {"type": "answer-relevance", "threshold": 0.5},
        ],
    )
    fake_llm.reply_with(
        lambda prompt: (
            "What is the weather in Paris?" if "Generate question" in prompt else "echo: " + prompt
        )
    )

    run = run_in_this_thread(launching.launch_run(card=card, provider=fake_openai))

    result = run.results.get()
    assert result.status == "passed", result.assertion_results
    embeddings = [r for r in fake_llm.requests if r.path == "/v1/embeddings"]
    assert len(embeddings) == 3 and embeddings[0].body["model"] == "text-embedding-3-large"
    assert result.tokens_in > 0


@pytest.mark.django_db(transaction=True)
def test_a_worker_survives_every_refusal_of_the_sandbox(
    worker_factory, fake_llm, fake_openai, make_card
):
    card = make_card(slug="sandbox", cases=0, template="Say {{ word }}", system_prompt="")
    hostile = {
        "require": "require('child_process').execSync('id')",
        "network": "fetch('http://127.0.0.1:1/')",
        "file": "process.binding('fs')",
        "endless loop": ENDLESS,
        "huge allocation": HUGE,
        "V8 abort": ABORTS_V8,
    }
    for order, (name, code) in enumerate(hostile.items()):
        TestCase.objects.create(
            card=card,
            name=name,
            order=order,
            variables={"word": name},
            assertions=[{"type": "javascript", "value": code}],
        )
    TestCase.objects.create(
        card=card,
        name="fine",
        order=99,
        variables={"word": "fine"},
        assertions=[{"type": "javascript", "value": "output.endsWith('fine')"}],
    )
    worker = worker_factory(processes=1, threads=2)

    run = launching.launch_run(card=card, provider=fake_openai, max_concurrent_tests=2)
    wait_for(
        lambda: TestRun.objects.get(pk=run.pk).status in TestRun.FINISHED,
        timeout=120,
        what="the run to finish",
    )

    results = {r.case_name: r for r in TestResult.objects.filter(run=run)}
    reasons = {name: results[name].assertion_results[0]["reason"] for name in hostile}
    assert all(results[name].status == "failed" for name in hostile), reasons
    assert "require is not available in this sandbox" in reasons["require"]
    assert "fetch is not available in this sandbox" in reasons["network"]
    assert "process.binding is not available" in reasons["file"]
    assert "time limit of 1000 ms" in reasons["endless loop"]
    assert "memory limit of 64 MB" in reasons["huge allocation"]
    assert "memory" in reasons["V8 abort"] or "time limit" in reasons["V8 abort"]
    assert results["fine"].status == "passed"
    assert worker.process.poll() is None  # the worker lived through all of it
    again = launching.launch_run(card=card, provider=fake_openai)
    wait_for(
        lambda: TestRun.objects.get(pk=again.pk).status in TestRun.FINISHED,
        timeout=120,
        what="a second run on the same worker",
    )
    assert TestResult.objects.get(run=again, case_name="fine").status == "passed"
    assert PromptCard.objects.filter(slug="sandbox").exists()
