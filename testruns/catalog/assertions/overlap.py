"""Scores of word overlap with reference texts, computed as promptfoo computes them: rouge-n
(ROUGE-1 F-score over Penn Treebank tokens, clipped counts) and bleu (BLEU-4 with the brevity
penalty, several references allowed). Both pass at the assertion's threshold (rouge-n 0.75,
bleu 0.5 by default)."""

from __future__ import annotations

import math
import re
from collections import Counter

from testruns.catalog.assertions.contract import MISSING, Context, Result, json_type, show_typed

ROUGE_THRESHOLD = 0.75
BLEU_THRESHOLD = 0.5
_CONTRACTIONS = re.compile(r"('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ")
_SPLIT_WORDS = [
    re.compile(rf"(?<![\w\u200c\u200d])({a})({b})(?![\w\u200c\u200d])", re.I)
    for a, b in [
        ("can", "not"),
        ("d", "'ye"),
        ("gim", "me"),
        ("gon", "na"),
        ("got", "ta"),
        ("lem", "me"),
        ("more", "'n"),
        ("'t", "is"),
        ("'t", "was"),
    ]
]


def treebank_tokens(text: str) -> list[str]:
    """The Penn Treebank tokenizer's main rules, as js-rouge (promptfoo's) applies them:
    punctuation and brackets apart, a sentence's last period apart, contractions split."""
    text = re.sub(r"\s+", " ", text).strip()
    if not text:
        return []
    text = re.sub(r'^"', " `` ", text)
    text = re.sub(r'(?<=[\s(\[{<])"', " `` ", text)
    text = text.replace('"', " '' ")
    text = text.replace("...", " ... ")
    text = re.sub(r"[:,](?!\d)", r" \g<0> ", text)
    text = re.sub(r"[;@#$%&]", r" \g<0> ", text)
    text = re.sub(r"([^.])(\.)([\])}>'\s]*)$", r"\1 \2\3 ", text)
    text = re.sub(r"[?!]", r" \g<0> ", text)
    text = re.sub(r"[\][(){}<>]", r" \g<0> ", text)
    text = text.replace("--", " -- ")
    text = f" {text} "
    text = re.sub(r"([^'])' ", r"\1 ' ", text)
    text = re.sub(r"'([sSmMdD]) ", r" '\1 ", text)
    text = _CONTRACTIONS.sub(r" \1 ", text)
    for pattern in _SPLIT_WORDS:
        text = pattern.sub(r" \1 \2 ", text)
    return [token for token in text.split(" ") if token]


def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def rouge_n(candidate: str, reference: str, n: int = 1) -> float:
    """ROUGE-N F1 with clipped counts, case-insensitive."""
    cand = _ngrams(treebank_tokens(candidate.lower()), n)
    ref = _ngrams(treebank_tokens(reference.lower()), n)
    if not cand or not ref:
        return 0.0
    overlap = sum((Counter(cand) & Counter(ref)).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / len(cand), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu(candidate: str, references: list[str]) -> float:
    """BLEU-4 (weights 0.25 each) over lower-cased words, the closest reference length for
    the brevity penalty, orders the candidate is too short for left out, as promptfoo."""
    if not candidate.strip():
        return 0.0
    words = candidate.lower().strip().split()
    refs = [ref.lower().strip().split() for ref in references]
    closest = min((len(ref) for ref in refs), key=lambda length: (abs(length - len(words)), length))
    logs = []
    for n in range(1, 5):
        grams = Counter(_ngrams(words, n))
        total = sum(grams.values())
        if not total:
            continue
        clipped = max(sum((grams & Counter(_ngrams(ref, n))).values()) for ref in refs)
        logs.append(math.log(clipped / total if clipped else 1e-7))
    if not logs:
        return 0.0
    penalty = 1.0 if len(words) > closest else math.exp(1 - closest / len(words))
    return penalty * math.exp(sum(logs) / len(logs))


def _scored(name: str, score: float, threshold: float) -> Result:
    verdict = "reaches" if score >= threshold else "is below"
    return Result(score >= threshold, score, f"{name} score {score:.3f} {verdict} {threshold:g}")


def check_rouge_n(value: str, ctx: Context) -> Result:
    threshold = ROUGE_THRESHOLD if ctx.threshold is None else ctx.threshold
    return _scored("ROUGE-1", rouge_n(ctx.output, value), threshold)


def check_bleu(value: str | list[str], ctx: Context) -> Result:
    threshold = BLEU_THRESHOLD if ctx.threshold is None else ctx.threshold
    return _scored(
        "BLEU", bleu(ctx.output, [value] if isinstance(value, str) else value), threshold
    )


def references_problems(value: object) -> list[str]:
    """A reference text, or (bleu) a non-empty list of them."""
    if value is MISSING:
        return ["value is required (the reference text)"]
    if isinstance(value, str):
        return [] if value.strip() else ["value must not be blank"]
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return []
    return [f"value must be a text or a list of texts, got {show_typed(value)}"]


def reference_problems(value: object) -> list[str]:
    if isinstance(value, list):
        return [f"value must be one reference text, got {json_type(value)}"]
    return references_problems(value)
