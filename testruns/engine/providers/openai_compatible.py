"""The `openai` kind: any OpenAI-compatible chat completions server (OpenAI, Ollama, vLLM,
LM Studio, llama.cpp, OpenRouter), through the OpenAI SDK with its retries off."""

from __future__ import annotations

import functools

import openai

from testruns.engine.providers.completion import Completion, Kind, ProviderError
from testruns.engine.providers.keys import api_key
from testruns.engine.providers.transport import RefusedAnswer, http_client
from testruns.engine.providers.vendor_http import (
    NOT_THE_API,
    allowed_parameters,
    json_answer,
    json_type,
    token_count,
    unsendable,
    usage_of,
    vendor_error,
)
from testruns.models import Provider

# Default parameters a provider may pass on. Anything else (a typo, a simulator knob, or a key
# that would change the shape of the answer, such as `stream`, `n` or `tools`) is left out.
OPENAI_PARAMETERS = frozenset(
    "temperature top_p max_tokens max_completion_tokens seed stop presence_penalty "
    "frequency_penalty logit_bias response_format reasoning_effort".split()
)
# Not in OpenAI's schema but understood by vLLM, llama.cpp and Ollama; sent as extra body.
OPENAI_EXTRA_PARAMETERS = frozenset({"top_k", "min_p", "repetition_penalty"})


def call_openai(provider: Provider, *, system: str, prompt: str, timeout: float) -> Completion:
    key = api_key(provider)
    params = provider.parameters or {}
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    try:
        # The raw response: the body is parsed and checked here, so that an answer of the
        # wrong shape is a clear ProviderError instead of whatever the SDK's parser raises.
        raw = _openai_client(provider.base_url, key).chat.completions.with_raw_response.create(
            model=provider.model,
            messages=messages,  # type: ignore[arg-type]
            timeout=timeout,
            extra_body=allowed_parameters(params, OPENAI_EXTRA_PARAMETERS) or None,
            **allowed_parameters(params, OPENAI_PARAMETERS),
        )
    except (openai.OpenAIError, RefusedAnswer) as exc:
        raise vendor_error(exc, key=key, timeout=timeout) from None
    except UnicodeEncodeError:
        raise unsendable() from None
    data = json_answer(raw.http_response, "a chat completion", key)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ProviderError(f"the answer has no choices; {NOT_THE_API}", kind=Kind.BAD_RESPONSE)
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise ProviderError(
            f"the answer's first choice has no message; {NOT_THE_API}", kind=Kind.BAD_RESPONSE
        )
    text = message.get("content")
    if text is None:  # a refusal or tool call: no text to check
        text = ""
    if not isinstance(text, str):
        raise ProviderError(
            f"the answer's content is {json_type(text)}, not text; {NOT_THE_API}",
            kind=Kind.BAD_RESPONSE,
        )
    completion = Completion(text)
    usage = usage_of(data, completion)
    completion.tokens_in = token_count(
        usage.get("prompt_tokens"), system + prompt, "input", completion
    )
    completion.tokens_out = token_count(usage.get("completion_tokens"), text, "output", completion)
    return completion


# A client costs ~25 ms of CPU to build (its TLS context), so one is kept per (URL, key) and
# reuses its connections; the timeout is given per request. A rotated key gets a new client.
@functools.lru_cache(maxsize=32)
def _openai_client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base_url or None,
        api_key=key,
        max_retries=0,
        http_client=http_client(base_url or "https://api.openai.com/v1"),
    )
