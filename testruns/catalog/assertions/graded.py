"""Assertions that ask models, beyond llm-rubric: `similar` (embeddings, cosine similarity),
and promptfoo's model-graded `factuality`, `answer-relevance`, `g-eval` and
`model-graded-closedqa`, with promptfoo's prompts and scoring. Nothing here touches the
network: the caller passes `grade` (prompt -> answer) and `embed` (texts -> vectors); either
raises GradingError when its provider cannot answer, which makes the assertion an error.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

from testruns.catalog.assertions.contract import Context, Result, binary, quote
from testruns.catalog.assertions.model_graded import GradingError

SIMILAR_THRESHOLD = 0.75
RELEVANCE_THRESHOLD = 0.5
G_EVAL_THRESHOLD = 0.7
G_EVAL_MAX_SCORE = 10
RELEVANCE_QUESTIONS = 3

FACTUALITY_SYSTEM = """You are a precise factuality evaluator that compares a submitted answer \
to an expert answer.

Your task is to analyze the factual content while ignoring differences in style, grammar, or \
punctuation.
You must categorize the submission into one of these options:

(A) The submitted answer is a subset of the expert answer and is fully consistent with it.
(B) The submitted answer is a superset of the expert answer and is fully consistent with it.
(C) The submitted answer contains all the same details as the expert answer.
(D) There is a disagreement between the submitted answer and the expert answer.
(E) The answers differ, but these differences don't matter from the perspective of factuality.

Respond ONLY with a JSON object in this format:
{"category": "[LETTER]", "reason": "[DETAILED EXPLANATION]"}"""
FACTUALITY_USER = """I need you to compare these answers:

<question>
{question}
</question>

<expert_answer>
{ideal}
</expert_answer>

<submitted_answer>
{output}
</submitted_answer>

Please analyze the factual relationship between these answers according to the categories \
you've been given."""
CLOSED_QA = """You are assessing a submitted answer on a given task based on a criterion. Here \
is the data:
[BEGIN DATA]
***
[Task]: {question}
***
[Submission]: {output}
***
[Criterion]: {criteria}
***
[END DATA]
Does the submission meet the criterion? First, write out in a step by step manner your \
reasoning about the criterion to be sure that your conclusion is correct. Avoid simply stating \
the correct answers at the outset. Then print only the single character "Y" or "N" (without \
quotes or punctuation) on its own line corresponding to the correct answer. At the end, repeat \
just the letter again by itself on a new line.

Reasoning:"""
G_EVAL_STEPS = """Given evaluation criteria that outline how you should judge a piece of text, \
generate 3-4 concise evaluation steps applicable to any text based on the criteria below and \
designed to check whether the criteria are satisfied by the text.

**EVALUATION CRITERIA**
{criteria}

Return output ONLY as a minified JSON object with a single key, "steps", whose value is a list \
of strings: {{"steps":["<Evaluation Step 1>","<Evaluation Step 2>","<Evaluation Step 3>"]}}
JSON:"""
G_EVAL_SCORE = """You will be given one Reply for a Prompt below. Your task is to rate the Reply \
on one metric.

**Evaluation Criteria**
{criteria}

**Evaluation Steps**
- {steps}
Given the evaluation steps, return a JSON with two keys: 1) a "score" key that MUST be an \
integer from 0 to {max_score}, where {max_score} indicates that the condition described by the \
Evaluation Criteria is fully and clearly observed in the Reply, and 0 that it is not observed at \
all; 2) a "reason" key, a reason for the given score.

**Prompt**
{question}

**Reply**
{output}

Return output ONLY as a minified JSON object: {{"score":0,"reason":"..."}}
JSON:"""
ANSWER_QUESTION = """Generate question for the given answer.
Answer:
The PSLV-C56 mission is scheduled to be launched on Sunday, 30 July 2023 at 06:30 IST / 01:00 \
UTC. It will be launched from the Satish Dhawan Space Centre, Sriharikota, Andhra Pradesh, India
Question: When is the scheduled launch date and time for the PSLV-C56 mission, and where will \
it be launched from?

Answer:{output}
Question:"""


def _asking(check: Callable[[str, Context], Result]) -> Callable[[str, Context], Result]:
    """A grader that cannot answer makes the assertion an error, not a failure; a missing
    grader or embeddings provider fails it with a reason."""

    def run(value: str, ctx: Context) -> Result:
        if ctx.grade is None:
            return binary(False, "no grader provider configured")
        try:
            return check(value, ctx)
        except GradingError as exc:  # no verdict on the output: an error, not a failure
            return Result(False, 0.0, str(exc), error=True)
        except Exception as exc:  # anything else fails this assertion, not the whole run
            return binary(False, f"grader call failed: {type(exc).__name__}: {exc}")

    return run


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def _embed(ctx: Context, texts: list[str]) -> list[list[float]]:
    vectors = ctx.embed(texts)
    if len(vectors) != len(texts):
        raise GradingError(f"the embeddings provider gave {len(vectors)} vectors for {len(texts)}")
    return vectors


def _question(ctx: Context) -> str:
    """What the model was asked: a `query` variable, as promptfoo reads it, else the prompt."""
    query = ctx.variables.get("query")
    return query if isinstance(query, str) else ctx.prompt


def check_similar(value: str | list[str], ctx: Context) -> Result:
    """Cosine similarity of the output's embedding with the value's (the best of several)."""
    threshold = SIMILAR_THRESHOLD if ctx.threshold is None else ctx.threshold
    expected = [value] if isinstance(value, str) else value
    if ctx.embed is None:
        return binary(False, "no embeddings provider configured")
    try:
        vectors = _embed(ctx, [ctx.output, *expected])
    except GradingError as exc:
        return Result(False, 0.0, str(exc), error=True)
    pairs = zip(vectors[1:], expected, strict=True)
    score, best = max((cosine(vectors[0], v), text) for v, text in pairs)
    verdict = "reaches" if score >= threshold else "is below"
    return Result(
        score >= threshold,
        max(0.0, score),
        f"similarity {score:.3f} to {quote(best, 60)} {verdict} the threshold {threshold:g}",
    )


@_asking
def check_factuality(value: str, ctx: Context) -> Result:
    user = FACTUALITY_USER.format(question=_question(ctx), ideal=value, output=ctx.output)
    answer = ctx.grade(f"{FACTUALITY_SYSTEM}\n\n{user}")
    match = re.search(r'"category"\s*:\s*"\s*\(?([A-Ea-e])', answer) or re.search(
        r"^\s*\(?([A-E])\)?\b", answer, re.M
    )
    if not match:
        return binary(False, f"grader answer could not be read: {quote(answer.strip())}")
    category = match[1].upper()
    reason = _json_field(answer, "reason") or f"category {category}"
    return binary(category != "D", f"grader: category {category}: {reason}")


@_asking
def check_closedqa(value: str, ctx: Context) -> Result:
    answer = ctx.grade(CLOSED_QA.format(question=_question(ctx), output=ctx.output, criteria=value))
    text = answer.rstrip()
    if text.endswith("Y"):
        return binary(True, "grader: the submission meets the criterion")
    if text.endswith("N"):
        return binary(False, "grader: the submission does not meet the criterion")
    return binary(False, f"grader answer ends in neither Y nor N: {quote(text[-80:])}")


@_asking
def check_g_eval(value: str, ctx: Context) -> Result:
    threshold = G_EVAL_THRESHOLD if ctx.threshold is None else ctx.threshold
    steps_answer = ctx.grade(G_EVAL_STEPS.format(criteria=value))
    steps = _json_object(steps_answer, "steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise GradingError(f"the grader gave no evaluation steps: {quote(steps_answer.strip())}")
    answer = ctx.grade(
        G_EVAL_SCORE.format(
            criteria=value,
            steps="\n- ".join(steps),
            max_score=G_EVAL_MAX_SCORE,
            question=ctx.prompt,
            output=ctx.output,
        )
    )
    raw = _json_object(answer, "score")
    try:
        score = float(raw)
    except (TypeError, ValueError):
        raise GradingError(f"the grader gave no score: {quote(answer.strip())}") from None
    if not 0 <= score <= G_EVAL_MAX_SCORE:
        raise GradingError(f"the grader's score {score:g} is outside 0-{G_EVAL_MAX_SCORE}")
    score /= G_EVAL_MAX_SCORE
    reason = _json_field(answer, "reason") or "no reason"
    return Result(
        score >= threshold, score, f"grader: {score:.2f} (at least {threshold:g}): {reason}"
    )


@_asking
def check_answer_relevance(value: object, ctx: Context) -> Result:
    """Questions the grader writes for the output, compared by embeddings with what was
    asked: the mean cosine similarity is the score."""
    threshold = RELEVANCE_THRESHOLD if ctx.threshold is None else ctx.threshold
    if ctx.embed is None:
        return binary(False, "no embeddings provider configured")
    prompt = ANSWER_QUESTION.format(output=ctx.output)
    questions = [ctx.grade(prompt).strip() for _ in range(RELEVANCE_QUESTIONS)]
    vectors = _embed(ctx, [_question(ctx), *questions])
    score = sum(cosine(vectors[0], v) for v in vectors[1:]) / len(questions)
    verdict = "reaches" if score >= threshold else "is below"
    return Result(
        score >= threshold, max(0.0, score), f"relevance {score:.3f} {verdict} {threshold:g}"
    )


def _json_object(text: str, key: str) -> object:
    """`key` of the first JSON object in the text that has it; None without one."""
    decoder = json.JSONDecoder()
    for match in list(re.finditer(r"\{", text))[:50]:
        try:
            value = decoder.raw_decode(text, match.start())[0]
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict) and key in value:
            return value[key]
    return None


def _json_field(text: str, key: str) -> str:
    value = _json_object(text, key)
    return value.strip() if isinstance(value, str) else ""
