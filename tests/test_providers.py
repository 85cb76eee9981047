"""Providers against a fake vendor over real HTTP (the real SDKs talk to it) and real local
programs. Provider rows are built in memory: nothing here needs the database."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from pathlib import Path

import pytest

from testruns.engine import providers
from testruns.engine.providers import ProviderError
from testruns.models import Provider

# fake_llm_fixture is the `fake_llm` fixture; imported under its own name so that test
# arguments called fake_llm do not shadow an import (ruff F811).
from tests.fake_llm import FakeLLMServer, FakeReply, fake_llm_fixture  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
PYTHON = shlex.quote(sys.executable)
SECRET = "sk-test-do-not-leak-0123456789"


def http_provider(server: FakeLLMServer, kind: str = Provider.Kind.OPENAI, **fields) -> Provider:
    fields.setdefault("model", "fake-model")
    return Provider(name=f"fake {kind}", kind=kind, base_url=server.base_url, **fields)


def command_provider(command: str) -> Provider:
    return Provider(name="local program", kind=Provider.Kind.COMMAND, command=command)


def call(
    provider: Provider, prompt: str = "Say hi.", *, system: str = "", timeout: float = 5.0
) -> providers.Completion:
    return providers.complete(provider, system=system, prompt=prompt, timeout=timeout)


def failure(provider: Provider, prompt: str = "Say hi.", *, timeout: float = 5.0) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        call(provider, prompt, timeout=timeout)
    return caught.value


def write_script(tmp_path: Path, source: str) -> str:
    script = tmp_path / "model.py"
    script.write_text(source)
    return f"{PYTHON} {shlex.quote(str(script))}"


# OpenAI-compatible kind


def test_openai_kind_returns_answer_usage_latency_and_cost(fake_llm):
    fake_llm.latency = 0.1
    provider = http_provider(
        fake_llm, price_input_per_mtok=Decimal("2"), price_output_per_mtok=Decimal("8")
    )

    completion = call(provider, "What is two plus two?", system="Be brief.")

    assert completion.text == "echo: What is two plus two?"
    # The fake counts words: 2 system + 5 user in, 6 out.
    assert (completion.tokens_in, completion.tokens_out) == (7, 6)
    assert completion.latency_ms >= 100
    cost = providers.cost_of(provider, completion.tokens_in, completion.tokens_out)
    assert cost == Decimal(7 * 2 + 6 * 8) / 1_000_000
    request = fake_llm.requests[-1]
    assert request.path == "/v1/chat/completions"
    assert request.body["model"] == "fake-model"
    assert request.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two plus two?"},
    ]


def test_empty_system_prompt_sends_only_the_user_message(fake_llm):
    call(http_provider(fake_llm), "Hello")

    assert fake_llm.requests[-1].body["messages"] == [{"role": "user", "content": "Hello"}]


def test_allowed_parameters_are_passed_through_and_others_dropped(fake_llm):
    allowed = {"temperature": 0.2, "max_tokens": 50, "top_p": 0.9, "seed": 7, "stop": ["END"]}
    provider = http_provider(
        fake_llm, parameters={**allowed, "top_k": 5, "stream": True, "latency_ms": 10}
    )

    call(provider)

    body = fake_llm.requests[-1].body
    assert {name: body[name] for name in allowed} == allowed
    assert body["top_k"] == 5  # an extension vLLM, llama.cpp and Ollama understand
    assert "stream" not in body and "latency_ms" not in body


def test_api_key_is_read_from_the_named_variable_and_sent_as_bearer(fake_llm, monkeypatch):
    monkeypatch.setenv("PCR_TEST_KEY", SECRET)
    provider = http_provider(fake_llm, api_key_env="PCR_TEST_KEY")

    completion = call(provider)

    assert fake_llm.requests[-1].headers["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in repr(completion) and SECRET not in repr(provider.__dict__)


def test_rotated_api_key_is_used_without_restart(fake_llm, monkeypatch):
    provider = http_provider(fake_llm, api_key_env="PCR_TEST_KEY")
    monkeypatch.setenv("PCR_TEST_KEY", "sk-old")
    call(provider)
    monkeypatch.setenv("PCR_TEST_KEY", "sk-new")
    call(provider)

    assert [r.headers["authorization"] for r in fake_llm.requests] == [
        "Bearer sk-old",
        "Bearer sk-new",
    ]


def test_api_key_echoed_by_the_vendor_never_reaches_the_error(fake_llm, monkeypatch):
    monkeypatch.setenv("PCR_TEST_KEY", SECRET)
    fake_llm.script([FakeReply(status=401, text=f"Incorrect API key provided: {SECRET}.")])

    error = failure(http_provider(fake_llm, api_key_env="PCR_TEST_KEY"))

    assert str(error) == "HTTP 401: Incorrect API key provided: [redacted]."
    assert error.retryable is False
    # Not chained either: the SDK's exception carries the request and its Authorization header.
    assert error.__cause__ is None and error.__suppress_context__
    rendered = "".join(traceback.format_exception(error))
    assert SECRET not in rendered and SECRET not in repr(error)


def test_unset_api_key_variable_fails_with_its_name_and_sends_nothing(fake_llm, monkeypatch):
    monkeypatch.delenv("PCR_MISSING_KEY", raising=False)

    error = failure(http_provider(fake_llm, api_key_env="PCR_MISSING_KEY"))

    assert "PCR_MISSING_KEY" in str(error)
    assert error.retryable is False
    assert fake_llm.request_count == 0


def test_local_server_without_a_key_variable_gets_a_placeholder_key(fake_llm):
    call(http_provider(fake_llm, api_key_env=""))

    assert fake_llm.requests[-1].headers["authorization"] == "Bearer not-needed"


def test_rate_limit_with_retry_after_seconds_is_retryable_after_that_long(fake_llm):
    fake_llm.script([FakeReply(status=429, headers={"Retry-After": "1"})])

    error = failure(http_provider(fake_llm))

    assert str(error) == "HTTP 429 rate limited (retry after 1.0s)"
    assert error.retryable is True
    assert error.retry_after == 1.0


def test_rate_limit_with_retry_after_http_date_is_converted_to_seconds(fake_llm):
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    fake_llm.script([FakeReply(status=429, headers={"Retry-After": when})])

    error = failure(http_provider(fake_llm))

    assert error.retryable is True
    assert 25 <= error.retry_after <= 30


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (408, True),
        (409, True),
        (422, False),
        (500, True),
        (502, True),
        (503, True),
    ],
)
def test_http_status_decides_whether_a_retry_may_help(fake_llm, status, retryable):
    fake_llm.script([FakeReply(status=status, text="the vendor explains")])

    error = failure(http_provider(fake_llm))

    assert str(error) == f"HTTP {status}: the vendor explains"
    assert error.retryable is retryable


def test_long_vendor_message_is_truncated(fake_llm):
    fake_llm.script([FakeReply(status=400, text="x" * 5000)])

    error = failure(http_provider(fake_llm))

    assert len(str(error)) <= len("HTTP 400: ") + 300


def test_hanging_server_ends_in_a_retryable_timeout_within_the_timeout(fake_llm):
    fake_llm.script([FakeReply(hang=True)])
    started = time.monotonic()

    error = failure(http_provider(fake_llm), timeout=0.5)

    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 2.0
    assert str(error) == "timed out after 0.5s"
    assert error.retryable is True


def test_refused_connection_is_retryable():
    server = FakeLLMServer().start()
    server.stop()  # nothing listens on its port any more

    error = failure(http_provider(server))

    assert str(error).startswith("connection failed: ")
    assert error.retryable is True


def test_answer_without_usage_gets_estimated_token_counts(fake_llm):
    message = {"role": "assistant", "content": "four words in here"}
    fake_llm.script([FakeReply(body={"choices": [{"index": 0, "message": message}]})])

    completion = call(http_provider(fake_llm))

    assert completion.text == "four words in here"
    assert completion.tokens_in > 0 and completion.tokens_out > 0


def test_answer_that_is_not_a_completion_fails_with_a_hint(fake_llm):
    fake_llm.script([FakeReply(body={"status": "ok"})])  # e.g. a base URL of some other API

    error = failure(http_provider(fake_llm))

    assert "no choices" in str(error) and "base URL" in str(error)


def test_connection_test_returns_the_answer(fake_llm):
    fake_llm.reply_with(lambda prompt: "OK")

    assert providers.test_connection(http_provider(fake_llm)) == "OK"
    assert fake_llm.requests[-1].body["messages"][-1]["content"] == "Reply with the word OK."


def test_connection_test_raises_provider_error_on_failure(fake_llm):
    fake_llm.script([FakeReply(status=404, text="model not found")])

    with pytest.raises(ProviderError, match="HTTP 404: model not found"):
        providers.test_connection(http_provider(fake_llm))


# Anthropic kind


def test_anthropic_kind_returns_answer_and_usage(fake_llm, monkeypatch):
    monkeypatch.setenv("PCR_TEST_KEY", SECRET)
    provider = http_provider(
        fake_llm,
        Provider.Kind.ANTHROPIC,
        api_key_env="PCR_TEST_KEY",
        parameters={"temperature": 0.3, "seed": 1},
    )

    completion = call(provider, "Name a colour.", system="One word.")

    assert completion.text == "echo: Name a colour."
    assert (completion.tokens_in, completion.tokens_out) == (5, 4)
    request = fake_llm.requests[-1]
    assert request.path == "/v1/messages"
    assert request.body["system"] == "One word."
    assert request.body["max_tokens"] == 1024
    assert request.body["temperature"] == 0.3 and "seed" not in request.body
    assert SECRET in request.headers.get("x-api-key", request.headers.get("authorization"))


def test_anthropic_kind_classifies_errors_like_openai(fake_llm):
    fake_llm.script(
        [
            FakeReply(status=429, headers={"Retry-After": "2"}),
            FakeReply(status=529),
            FakeReply(hang=True),
        ]
    )
    provider = http_provider(fake_llm, Provider.Kind.ANTHROPIC)

    rate_limited, overloaded, hung = (failure(provider, timeout=0.5) for _ in range(3))

    assert (rate_limited.retryable, rate_limited.retry_after) == (True, 2.0)
    assert overloaded.retryable is True and str(overloaded).startswith("HTTP 529")
    assert str(hung) == "timed out after 0.5s"


# Local command kind


def test_command_kind_answers_from_stdout_with_the_system_prompt_in_env(tmp_path):
    command = write_script(
        tmp_path,
        "import os, sys\nprint(os.environ['PROMPT_SYSTEM'], '|', sys.stdin.read().upper())\n",
    )

    completion = call(command_provider(command), "make me loud", system="Shout.")

    assert completion.text == "Shout. | MAKE ME LOUD"
    assert completion.tokens_in > 0 and completion.tokens_out > 0


def test_command_runs_without_a_shell(tmp_path):
    script = write_script(tmp_path, "import json, sys\nprint(json.dumps(sys.argv[1:]))\n")

    completion = call(command_provider(f"{script} 'hello; echo pwned' '$HOME' '`id`'"))

    assert json.loads(completion.text) == ["hello; echo pwned", "$HOME", "`id`"]


def test_command_nonzero_exit_fails_with_the_tail_of_stderr(tmp_path):
    command = write_script(
        tmp_path, "import sys\nsys.stderr.write('noise ' * 200 + 'model file missing')\nsys.exit(3)"
    )

    error = failure(command_provider(command))

    assert str(error).startswith("command exited with status 3: ")
    assert str(error).endswith("model file missing")
    assert len(str(error)) < 400
    assert error.retryable is False


def test_command_exit_status_75_asks_for_a_retry(tmp_path):
    command = write_script(tmp_path, "import sys\nsys.exit(75)")

    assert failure(command_provider(command)).retryable is True


def test_command_timeout_ends_the_call_within_the_timeout(tmp_path):
    command = write_script(tmp_path, "import time\ntime.sleep(60)")
    started = time.monotonic()

    error = failure(command_provider(command), timeout=0.5)

    assert time.monotonic() - started < 2.0
    assert str(error) == "command timed out after 0.5s"
    assert error.retryable is False


def test_missing_program_fails_clearly(tmp_path):
    error = failure(command_provider(str(tmp_path / "no-such-model")))

    assert str(error).startswith("command could not start: ")


# The fake vendor itself


def test_fake_server_records_peak_concurrency_of_parallel_requests(fake_llm):
    fake_llm.latency = 0.5  # long enough for every request to be in flight at once
    fake_llm.reply_with(lambda prompt: prompt.upper())
    provider = http_provider(fake_llm)
    prompts = [f"case {i}" for i in range(8)]

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        answers = list(pool.map(lambda prompt: call(provider, prompt).text, prompts))

    assert answers == [prompt.upper() for prompt in prompts]
    assert fake_llm.peak_concurrency == len(prompts)
    assert fake_llm.request_count == len(prompts)
    assert fake_llm.in_flight == 0


def test_fake_server_plays_its_script_in_order_then_falls_back(fake_llm):
    fake_llm.script([FakeReply(text="first"), FakeReply(status=500), FakeReply(text="third")])
    provider = http_provider(fake_llm)

    assert call(provider).text == "first"
    assert failure(provider).retryable is True
    assert call(provider).text == "third"
    assert call(provider, "again").text == "echo: again"


def test_fake_server_reset_clears_script_records_and_peak(fake_llm):
    fake_llm.script([FakeReply(text="scripted"), FakeReply(text="never played")])
    fake_llm.reply_with(lambda prompt: "ruled")
    call(http_provider(fake_llm))

    fake_llm.reset()

    assert (fake_llm.request_count, fake_llm.peak_concurrency, fake_llm.requests) == (0, 0, [])
    assert call(http_provider(fake_llm), "plain").text == "echo: plain"


def test_fake_server_stops_promptly_while_a_request_hangs():
    server = FakeLLMServer().start()
    arrived = threading.Event()

    def hang(prompt: str) -> FakeReply:
        arrived.set()
        return FakeReply(hang=True)

    server.reply_with(hang)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(failure, http_provider(server), timeout=30)
        assert arrived.wait(10)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.0
        # The server closed the connection unanswered: the client sees a retryable failure.
        assert pending.result(timeout=10).retryable is True


def test_standalone_fake_server_prints_its_url_and_takes_control_requests():
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_llm", "--port", "0", "--latency", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = process.stdout.readline().strip()
        root = base_url.removesuffix("/v1")
        control = json.dumps({"script": [{"status": 503, "text": "warming up"}]}).encode()
        urllib.request.urlopen(urllib.request.Request(f"{root}/_control", data=control), timeout=5)
        provider = Provider(name="remote fake", kind="openai", model="m", base_url=base_url)

        assert str(failure(provider)) == "HTTP 503: warming up"
        assert call(provider, "hi").text == "echo: hi"
        with urllib.request.urlopen(f"{root}/_stats", timeout=5) as response:
            assert json.load(response)["request_count"] == 2
    finally:
        process.terminate()
        process.wait(timeout=10)
