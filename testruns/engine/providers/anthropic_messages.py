"""The `anthropic` kind: Anthropic's Messages API, through its SDK with its retries off."""

from __future__ import annotations

import functools

import anthropic

from testruns.engine.providers.completion import Completion, Kind, ProviderError
from testruns.engine.providers.keys import api_key
from testruns.engine.providers.transport import RefusedAnswer, http_client
from testruns.engine.providers.vendor_http import (
    NOT_THE_API,
    allowed_parameters,
    json_answer,
    token_count,
    unsendable,
    usage_of,
    vendor_error,
)
from testruns.models import Provider

# max_tokens is required by Anthropic and set on its own; the rest go in the body as given.
ANTHROPIC_PARAMETERS = frozenset({"temperature", "top_p", "top_k", "stop_sequences"})
ANTHROPIC_DEFAULT_MAX_TOKENS = 1024


def call_anthropic(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
    key = api_key(provider)
    params = provider.parameters or {}
    try:
        raw = _anthropic_client(provider.base_url, key).messages.with_raw_response.create(
            model=provider.model,
            max_tokens=int(params.get("max_tokens", ANTHROPIC_DEFAULT_MAX_TOKENS)),
            system=system or anthropic.omit,
            messages=[{"role": "user", "content": prompt}],
            # Given per request, it also skips the SDK's "use streaming" guess from max_tokens.
            timeout=timeout,
            extra_body=allowed_parameters(params, ANTHROPIC_PARAMETERS) or None,
        )
    except (anthropic.AnthropicError, RefusedAnswer) as exc:
        raise vendor_error(exc, key=key, timeout=timeout) from None
    except UnicodeEncodeError:
        raise unsendable() from None
    data = json_answer(raw.http_response, "a message", key)
    content = data.get("content")
    if not isinstance(content, list):
        raise ProviderError(f"the answer has no content; {NOT_THE_API}", kind=Kind.BAD_RESPONSE)
    texts = [
        block.get("text")
        for block in content
        if isinstance(block, dict) and block.get("type") == "text"
    ]
    if not all(isinstance(text, str) for text in texts):
        raise ProviderError(
            f"a text block of the answer holds no text; {NOT_THE_API}", kind=Kind.BAD_RESPONSE
        )
    text = "".join(texts)
    completion = Completion(text)
    usage = usage_of(data, completion)
    completion.tokens_in = token_count(
        usage.get("input_tokens"), system + prompt, "input", completion
    )
    completion.tokens_out = token_count(usage.get("output_tokens"), text, "output", completion)
    return completion


# One client per (URL, key), as for the OpenAI kind: building one costs ~25 ms of CPU.
@functools.lru_cache(maxsize=32)
def _anthropic_client(base_url: str, key: str) -> anthropic.Anthropic:
    # The SDK adds /v1 itself; OpenAI-style URLs include it, so a pasted one works too.
    base_url = base_url.rstrip("/").removesuffix("/v1")
    return anthropic.Anthropic(
        base_url=base_url or None,
        api_key=key,
        max_retries=0,
        http_client=http_client(base_url or "https://api.anthropic.com"),
    )
