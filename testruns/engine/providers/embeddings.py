"""Embeddings, for the `similar` and `answer-relevance` assertions: an OpenAI-compatible
`/v1/embeddings` call (the model is the provider's `embedding_model` parameter, else OpenAI's
text-embedding-3-large, promptfoo's default), or the simulator's hashed bag of words. Other
kinds cannot embed. Like completions: the SDK's retries off, the body parsed and checked
here, every failure a ProviderError."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import openai

from testruns.engine.providers.completion import Kind, ProviderError, rough_tokens
from testruns.engine.providers.keys import api_key
from testruns.engine.providers.openai_compatible import _openai_client
from testruns.engine.providers.transport import RefusedAnswer
from testruns.engine.providers.vendor_http import NOT_THE_API, json_answer, unsendable, vendor_error
from testruns.models import Provider

DEFAULT_EMBEDDING_MODEL = "text-embedding-3-large"
SIMULATED_DIMENSIONS = 256


@dataclass
class Embeddings:
    vectors: list[list[float]]
    tokens_in: int = 0
    latency_ms: float = 0.0


def embedding_model(provider: Provider) -> str:
    model = (provider.parameters or {}).get("embedding_model")
    return model if isinstance(model, str) and model else DEFAULT_EMBEDDING_MODEL


def embed(provider: Provider, texts: list[str], *, timeout: float) -> Embeddings:
    """One vector per text, in order; raises ProviderError."""
    if provider.kind == Provider.Kind.SIMULATOR:
        return Embeddings(
            [hashed_bag_of_words(text) for text in texts], rough_tokens(" ".join(texts))
        )
    if provider.kind != Provider.Kind.OPENAI:
        raise ProviderError(
            f"a {provider.get_kind_display()} provider cannot compute embeddings; name an "
            "OpenAI-compatible grader provider",
            kind=Kind.CONFIG,
        )
    key = api_key(provider)
    try:
        raw = _openai_client(provider.base_url, key).embeddings.with_raw_response.create(
            model=embedding_model(provider), input=texts, timeout=timeout
        )
    except (openai.OpenAIError, RefusedAnswer) as exc:
        raise vendor_error(exc, key=key, timeout=timeout) from None
    except UnicodeEncodeError:
        raise unsendable() from None
    data = json_answer(raw.http_response, "a list of embeddings", key)
    items = data.get("data")
    if not isinstance(items, list) or len(items) != len(texts):
        raise ProviderError(
            f"the answer has no embedding for each of the {len(texts)} texts; {NOT_THE_API}",
            kind=Kind.BAD_RESPONSE,
        )
    ordered = sorted(items, key=lambda item: item.get("index", 0) if isinstance(item, dict) else 0)
    vectors = [item.get("embedding") if isinstance(item, dict) else None for item in ordered]
    if not all(_is_vector(vector) for vector in vectors):
        raise ProviderError(
            f"an embedding in the answer is not a list of numbers; {NOT_THE_API}",
            kind=Kind.BAD_RESPONSE,
        )
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens = usage.get("prompt_tokens")
    tokens = tokens if type(tokens) is int and tokens >= 0 else rough_tokens(" ".join(texts))
    return Embeddings(vectors, tokens)


def _is_vector(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in value)
        and all(math.isfinite(x) for x in value)
    )


def hashed_bag_of_words(text: str, dimensions: int = SIMULATED_DIMENSIONS) -> list[float]:
    """A deterministic embedding: each lower-cased word adds 1 at the place its hash picks,
    normalised, so texts sharing words are close and texts sharing none are orthogonal."""
    vector = [0.0] * dimensions
    for word in re.findall(r"\w+", text.lower()):
        vector[int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % dimensions] += 1
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]
