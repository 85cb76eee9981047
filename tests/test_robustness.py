"""Everything after the claim ends: whatever the vendor answers, whatever the database
refuses and whatever exception nobody foresaw, a claimed case gets a terminal result, its run
ends and every slot comes back (each semaphore's in_use equals its lease rows, and is 0).

Most cases run here, in this process, through execution.run_admitted_case against the fake vendor
over real HTTP and the real PostgreSQL; the last test runs a real worker process with one
thread, to show that the thread survives every bad answer and goes on to the next case."""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.request
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.db import connection as own
from dramatiq.middleware.shutdown import Shutdown
from dramatiq.middleware.threading import raise_thread_exception
from dramatiq.middleware.time_limit import TimeLimitExceeded

from testruns.engine import (
    admission,
    execution,
    gate,
    inflight,
    launching,
    providers,
    recording,
)
from testruns.models import Lease, Provider, Semaphore, TestResult, TestRun
from tests.conftest import ROOT, assert_every_slot_returned, run_in_this_thread, wait_for
from tests.fake_llm import FakeLLMServer, FakeReply

pytestmark = pytest.mark.django_db(transaction=True)

HOLDER = "robustness-test-worker"
HTML = "<!doctype html><html><head><title>Welcome</title></head><body>nginx</body></html>"
MB = 1024 * 1024


@pytest.fixture
def provider(fake_llm):
    return Provider.objects.create(
        name="fake",
        kind="openai",
        model="m",
        base_url=fake_llm.base_url,
        max_concurrency=4,
        timeout_seconds=10,
        price_input_per_mtok=3,
        price_output_per_mtok=15,
    )


def run_here(run: TestRun) -> TestRun:
    return run_in_this_thread(run, holder=HOLDER, hand_over=True)


def only_result(run: TestRun) -> TestResult:
    return run.results.get()


def notes(result: TestResult) -> list[str]:
    return [o["reason"] for o in result.assertion_results if o["type"] == "note"]


# --- What the vendor answers ----------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/html", "application/json"])
def test_an_html_page_with_status_200_is_a_clear_error(fake_llm, provider, make_card, content_type):
    fake_llm.script([FakeReply(raw=HTML, content_type=content_type)])

    run = run_here(launching.launch_run(card=make_card(cases=1), provider=provider))

    result = only_result(run)
    assert result.status == "error"
    assert result.error == (
        f"the vendor answered with something that is not a chat completion ({content_type}, "
        f"{len(HTML)} bytes); is the base URL right, and the model served there?"
    )
    assert result.attempts == 1  # a wrong base URL stays wrong: not retried
    assert (run.status, run.error_count, run.done_count) == ("error", 1, 1)
    assert_every_slot_returned()


def test_an_answer_that_is_no_completion_is_a_clear_error(fake_llm, provider, make_card):
    fake_llm.script(
        [
            FakeReply(body={"choices": "none"}),
            FakeReply(body={"choices": [{"message": {"content": {"text": "nested"}}}]}),
            FakeReply(body={"choices": [{"index": 0}]}),
        ]
    )

    run = run_here(launching.launch_run(card=make_card(cases=3), provider=provider))

    errors = list(run.results.order_by("position").values_list("error", flat=True))
    assert errors[0].startswith("the answer has no choices")
    assert errors[1].startswith("the answer's content is an object, not text")
    assert errors[2].startswith("the answer's first choice has no message")
    assert run.status == "error" and run.done_count == 3
    assert_every_slot_returned()


def test_text_the_database_cannot_store_is_replaced_and_the_result_says_so(
    fake_llm, provider, make_card
):
    fake_llm.reply_with(lambda prompt: "N0: a\x00b" if "N0" in prompt else "N1: c\ud800d")

    run = run_here(launching.launch_run(card=make_card(cases=2), provider=provider))

    nul, surrogate = run.results.order_by("position")
    assert (nul.status, nul.output) == ("passed", "N0: a\ufffdb")
    assert (surrogate.status, surrogate.output) == ("passed", "N1: c\ufffdd")
    for result in (nul, surrogate):
        assert notes(result) == [
            "the output held 1 character the database cannot store (NUL "
            "or a lone surrogate), stored as U+FFFD"
        ]
        assert result.score == 1.0  # a note is no assertion: it does not change the score
    assert run.status == "succeeded"
    assert_every_slot_returned()


def test_prompt_and_error_text_with_nul_are_stored_with_a_note(fake_llm, provider, make_card):
    card = make_card(cases=1, template="Say {{ name }}{{ '\\x00' }}")
    fake_llm.script([FakeReply(status=400, text="bad \x00 input")])

    run = run_here(launching.launch_run(card=card, provider=provider))

    result = only_result(run)
    assert result.status == "error"
    assert result.prompt == "Say N0\ufffd"
    assert result.error.startswith("HTTP 400: bad \ufffd input\n")
    assert "Note: the prompt held 1 character the database cannot store" in result.error
    assert "Note: the error message held 1 character" in result.error
    assert run.status == "error"
    assert_every_slot_returned()


def test_a_prompt_with_a_lone_surrogate_is_not_sent(fake_llm, provider, make_card):
    card = make_card(cases=1, template="Say {{ name }}{{ '\\ud800' }}")

    run = run_here(launching.launch_run(card=card, provider=provider))

    result = only_result(run)
    assert result.status == "error" and fake_llm.request_count == 0
    assert result.error.startswith("the prompt cannot be sent: it holds a lone surrogate")
    assert result.prompt == "Say N0\ufffd"
    assert_every_slot_returned()


def test_untrusted_token_counts_are_estimated_and_noted(fake_llm, provider, make_card):
    fake_llm.script(
        [
            FakeReply(usage={"prompt_tokens": -5, "completion_tokens": 10**12, "total_tokens": -1}),
            FakeReply(usage={"prompt_tokens": 3.5, "completion_tokens": "many"}),
            FakeReply(usage=["not", "an", "object"]),
        ]
    )

    run = run_here(launching.launch_run(card=make_card(cases=3), provider=provider))

    negative, fractional, shapeless = run.results.order_by("position")
    for result in (negative, fractional, shapeless):
        assert result.status == "passed"
        assert 0 < result.tokens_in < 100 and 0 < result.tokens_out < 100
        assert 0 < result.cost < Decimal("0.01")
    assert notes(negative) == [
        f"the vendor reported -5 input tokens; estimated {negative.tokens_in} instead",
        f"the vendor reported 1000000000000 output tokens; estimated {negative.tokens_out} instead",
    ]
    assert notes(fractional)[1] == (
        f'the vendor reported "many" output tokens; estimated {fractional.tokens_out} instead'
    )
    assert notes(shapeless) == ["the vendor's usage is an array, not an object"]
    results = run.results.all()
    assert run.tokens_in == sum(r.tokens_in for r in results)
    assert run.cost == sum(r.cost for r in results) and run.status == "succeeded"
    assert_every_slot_returned()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_answer_of_50_mb_is_refused_without_being_read(fake_llm, provider, make_card, chunked):
    fake_llm.script([FakeReply(size=50 * MB, chunked=chunked)])
    run = launching.launch_run(card=make_card(cases=1), provider=provider)

    tracemalloc.start()
    try:
        run = run_here(run)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    result = only_result(run)
    assert result.status == "error" and result.attempts == 1
    assert result.error == (
        "the answer was larger than 4 MiB (the limit VENDOR_MAX_RESPONSE_BYTES sets)"
    )
    assert peak < 16 * MB  # at most the limit was ever held, never the 50 MB
    assert run.status == "error"
    assert_every_slot_returned()


def test_a_gzip_bomb_is_refused_once_it_grows_past_the_limit(fake_llm, provider, make_card):
    # 50 MB of answer in about 50 KB of gzip, sent although the client asked for identity.
    fake_llm.script([FakeReply(size=50 * MB, gzip=True)])
    run = launching.launch_run(card=make_card(cases=1), provider=provider)

    tracemalloc.start()
    try:
        run = run_here(run)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert only_result(run).error.startswith("the answer was larger than 4 MiB")
    assert peak < 16 * MB
    assert fake_llm.requests[-1].headers["accept-encoding"] == "identity"
    assert_every_slot_returned()


def test_a_trickling_answer_ends_within_its_timeout_and_a_bounded_margin(
    fake_llm, provider, make_card
):
    # A byte every 0.2 s: no single read waits a second, so a read timeout never fires, and
    # the whole answer would take a minute.
    fake_llm.script([FakeReply(trickle=0.2)])
    run = launching.launch_run(
        card=make_card(cases=1), provider=provider, timeout_seconds=1, max_retries=0
    )
    started = time.monotonic()

    run = run_here(run)

    assert time.monotonic() - started < 1 + providers.STREAM_GRACE_SECONDS + 3
    result = only_result(run)
    assert (result.status, result.error) == ("error", "timed out after 1.0s")
    assert_every_slot_returned()


def test_an_answer_just_under_the_limit_is_read(fake_llm, provider, make_card, settings):
    settings.VENDOR_MAX_RESPONSE_BYTES = MB
    fake_llm.script([FakeReply(size=MB - 1, chunked=True)])

    run = run_here(launching.launch_run(card=make_card(cases=1), provider=provider))

    result = only_result(run)
    assert result.status == "failed" and len(result.output) > MB - 500  # no "N0" in it


@pytest.mark.parametrize(
    ("reply", "kind", "retryable"),
    [
        (FakeReply(raw=HTML), "bad_response", False),
        (FakeReply(body={"error": {"message": "upstream died"}}), "server_error", True),
        (FakeReply(status=429), "rate_limited", True),
        (FakeReply(status=500), "server_error", True),
        (FakeReply(status=401), "auth", False),
        (FakeReply(status=404), "client_error", False),
        (FakeReply(hang=True), "timeout", True),
        (FakeReply(size=5 * MB), "bad_response", False),
    ],
    ids=["html", "error-in-200", "429", "500", "401", "404", "hang", "5-mb"],
)
@pytest.mark.parametrize("kind_of_vendor", ["openai", "anthropic"])
def test_every_provider_error_has_a_kind(fake_llm, reply, kind, retryable, kind_of_vendor):
    fake_llm.script([reply])
    vendor = Provider(name="v", kind=kind_of_vendor, model="m", base_url=fake_llm.base_url)

    with pytest.raises(providers.ProviderError) as caught:
        providers.complete(vendor, system="", prompt="hi", timeout=0.5)

    assert (caught.value.kind, caught.value.retryable) == (kind, retryable)


def test_provider_setup_and_connection_errors_have_kinds(monkeypatch):
    gone = FakeLLMServer().start()
    gone.stop()
    refused = Provider(name="v", kind="openai", model="m", base_url=gone.base_url)
    monkeypatch.delenv("PCR_NO_SUCH_KEY", raising=False)
    keyless = Provider(
        name="k", kind="openai", model="m", base_url=gone.base_url, api_key_env="PCR_NO_SUCH_KEY"
    )

    kinds = []
    for vendor in (refused, keyless, Provider(name="u", kind="nonsense")):
        with pytest.raises(providers.ProviderError) as caught:
            providers.complete(vendor, system="", prompt="hi", timeout=1)
        kinds.append(caught.value.kind)

    assert kinds == ["connection", "config", "config"]


def test_a_local_command_is_stopped_past_the_limit(tmp_path, settings):
    settings.VENDOR_MAX_RESPONSE_BYTES = MB
    script = tmp_path / "flood.py"
    script.write_text(
        "import sys\nsys.stderr.write('e' * 10**6)\n"
        "while True:\n    sys.stdout.write('x' * 65536)\n"
    )
    command = Provider(
        name="c",
        kind="command",
        command=f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}",
    )
    started = time.monotonic()

    with pytest.raises(providers.ProviderError) as caught:
        providers.complete(command, system="", prompt="hi", timeout=30)

    assert time.monotonic() - started < 10  # stopped, not waited for its 30 s
    assert str(caught.value) == (
        "the command's answer was larger than 1 MiB (the limit VENDOR_MAX_RESPONSE_BYTES sets)"
    )
    assert caught.value.kind == "bad_response"


def test_the_standalone_fake_vendor_can_be_scripted_with_every_bad_answer():
    """The chaos test drives a fake vendor in another process through /_control."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_llm", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = process.stdout.readline().strip()
        script = (
            '{"script": [{"raw": "<html></html>"}, {"text": "a\\u0000b"}, '
            '{"text": "\\ud800"}, {"usage": {"prompt_tokens": -1}}, '
            '{"size": 52428800, "chunked": true}, {"trickle": 0.01}]}'
        )
        request = urllib.request.Request(
            base_url.removesuffix("/v1") + "/_control", data=script.encode()
        )
        urllib.request.urlopen(request, timeout=5).close()
        vendor = Provider(name="remote", kind="openai", model="m", base_url=base_url)

        def answer() -> str | providers.ProviderError:
            try:
                return providers.complete(vendor, system="", prompt="hi", timeout=10).text
            except providers.ProviderError as exc:
                return exc

        html, nul, surrogate, tokens, huge, trickled = (answer() for _ in range(6))
        assert html.kind == "bad_response" and "text/html" in str(html)
        assert (nul, surrogate, tokens) == ("a\x00b", "\ud800", "echo: hi")
        assert huge.kind == "bad_response"
        assert trickled == "echo: hi"
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- Exceptions nobody foresaw --------------------------------------------------------------


def test_an_exception_in_the_assertions_is_an_error_result_and_the_next_case_runs(
    fake_llm, provider, make_card, caplog
):
    run = launching.launch_run(card=make_card(cases=2), provider=provider, max_concurrent_tests=1)
    # A value the code never expected, as an import or a bug could leave it in the row.
    TestResult.objects.filter(run=run, position=0).update(assertions=7)

    with caplog.at_level(logging.ERROR, logger="testruns.engine.execution"):
        run = run_here(run)

    broken, fine = run.results.order_by("position")
    assert broken.status == "error"
    assert broken.error == "unexpected error: TypeError: 'int' object is not iterable"
    assert broken.prompt == "Say hello to N0." and broken.attempts == 1
    assert fine.status == "passed"  # handed over to the same thread, which went on
    assert (run.status, run.done_count) == ("error", 2)
    logged = [r for r in caplog.records if r.getMessage().startswith("case failed")]
    assert logged and logged[0].exc_info and logged[0].exc_info[0] is TypeError
    assert_every_slot_returned()


# --- What the database refuses --------------------------------------------------------------


def test_a_value_the_database_refuses_ends_the_case_as_a_bare_error(fake_llm, provider, make_card):
    # The run's cost is at the ceiling of its numeric(14, 6) column, and each input token of
    # this (mistyped) price costs 1: adding the case's cost overflows the column.
    Provider.objects.filter(pk=provider.pk).update(price_input_per_mtok=1_000_000)
    run = launching.launch_run(card=make_card(cases=1), provider=provider)
    TestRun.objects.filter(pk=run.pk).update(cost=Decimal("99999999"))

    run = run_here(run)

    result = only_result(run)
    assert result.status == "error"
    assert result.error.startswith(
        "the result could not be saved (it had passed): DataError: numeric field overflow"
    )
    assert (result.cost, result.tokens_in, result.output) == (0, 0, "")
    assert (run.status, run.error_count, run.done_count) == ("error", 1, 1)
    assert_every_slot_returned()


def test_a_lost_database_connection_is_retried_on_a_new_one(fake_llm, provider, make_card, caplog):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        worker_backend = cursor.fetchone()[0]

    def restart_the_workers_connection(prompt: str) -> str:
        # As if PostgreSQL restarted while the vendor was thinking: the worker thread's
        # connection is terminated under it.
        from django.db import connection as own

        try:
            with own.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", [worker_backend])
        finally:
            own.close()
        return "N0 after the restart"

    fake_llm.reply_with(restart_the_workers_connection)
    run = launching.launch_run(card=make_card(cases=1), provider=provider)

    with caplog.at_level(logging.WARNING, logger="testruns.engine.recording"):
        run = run_here(run)

    result = only_result(run)
    assert (result.status, result.output) == ("passed", "N0 after the restart")
    assert any("trying again" in r.getMessage() for r in caplog.records)
    assert run.status == "succeeded"
    assert_every_slot_returned()


@pytest.fixture
def short_statement_timeout(monkeypatch):
    """New connections give up on a statement after 300 ms (the product's ceiling is 30 s)."""
    monkeypatch.setitem(connection.settings_dict["OPTIONS"], "options", "-c statement_timeout=300")
    connection.close()
    yield
    monkeypatch.undo()
    connection.close()  # the next test gets a connection with the usual ceiling


def test_a_database_gone_for_longer_than_the_retries_leaves_the_case_to_the_sweeper(
    fake_llm, provider, make_card, monkeypatch, short_statement_timeout
):
    monkeypatch.setattr(recording, "RECORD_RETRY_DELAYS", (0.05, 0.05))
    monkeypatch.setattr(recording, "BARE_RECORD_RETRY_DELAYS", (0.05,))
    locked, release = threading.Event(), threading.Event()
    lockers: list[threading.Thread] = []
    semaphore = gate.provider_semaphore(provider.pk)

    def hold_the_semaphore_row() -> None:
        # A stuck transaction holds the provider's row: every write of the result waits on
        # it until its statement times out, as when the database does not answer.
        from django.db import connection as own

        try:
            with transaction.atomic():
                Semaphore.objects.select_for_update().get(name=semaphore)
                locked.set()
                release.wait(20)
        finally:
            own.close()

    def answer_while_locked(prompt: str) -> str:
        lockers.append(threading.Thread(target=hold_the_semaphore_row, daemon=True))
        lockers[0].start()
        assert locked.wait(10)
        return "N0 fine"

    fake_llm.reply_with(answer_while_locked)
    run = launching.launch_run(card=make_card(cases=1), provider=provider)
    admission.admit_cases(provider.pk)
    result = TestResult.objects.get(run=run)
    lease = Lease.objects.get(result=result)

    try:
        execution.run_admitted_case(result.pk, HOLDER)
    finally:
        release.set()
        for locker in lockers:
            locker.join(10)

    lease.refresh_from_db()
    result.refresh_from_db()
    assert result.status == "running"  # nothing could be written...
    assert lease.holder == ""  # ...so the lease is no longer this worker's to renew,
    assert gate.heartbeat(HOLDER, [lease.pk]) == 0
    assert admission.reclaim_expired_cases() == 1  # and the sweeper takes the case back at once
    # (and admits it again into the freed slot, for any worker to run)
    assert not Lease.objects.filter(pk=lease.pk).exists()
    assert Lease.objects.get(result=result).holder == ""

    fake_llm.reply_with(None)
    run = run_here(run)  # and it runs again
    assert only_result(run).status == "passed" and run.status == "succeeded"
    assert_every_slot_returned()


def test_a_lease_that_cannot_be_handed_back_yet_is_handed_back_on_the_next_sweep(
    provider, make_card
):
    run = launching.launch_run(card=make_card(cases=1), provider=provider)
    admission.admit_cases(provider.pk)
    result = TestResult.objects.get(run=run)
    lease_id = gate.claim_case(result.pk, HOLDER)
    inflight.forsake_later(lease_id)  # as when the database was down when the case gave up

    inflight.notice_lost_leases()  # what the sweep thread calls on every tick

    assert inflight.forsaken() == set()
    assert Lease.objects.get(pk=lease_id).holder == ""
    assert admission.reclaim_expired_cases() == 1


# --- Interrupts -----------------------------------------------------------------------------


def run_in_thread_until_interrupted(
    result_id: int, interrupt: type[BaseException], fake_llm
) -> BaseException | None:
    """run_admitted_case in a thread of its own, interrupted the way Dramatiq interrupts one
    (an asynchronous exception) while the vendor is answering."""
    raised: list[BaseException] = []

    def work() -> None:

        try:
            execution.run_admitted_case(result_id, HOLDER)
        except BaseException as exc:
            raised.append(exc)
        finally:
            own.close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    wait_for(lambda: fake_llm.in_flight == 1, what="the case to be mid-call")
    raise_thread_exception(thread.ident, interrupt)
    thread.join(30)
    assert not thread.is_alive()
    return raised[0] if raised else None


def test_the_time_limit_mid_case_records_an_error_and_returns_the_slot(
    fake_llm, provider, make_card
):
    fake_llm.script([FakeReply(hang=True)])
    run = launching.launch_run(card=make_card(cases=2), provider=provider, max_concurrent_tests=1)
    admission.admit_cases(provider.pk)
    first = TestResult.objects.get(run=run, position=0)

    raised = run_in_thread_until_interrupted(first.pk, TimeLimitExceeded, fake_llm)

    assert isinstance(raised, TimeLimitExceeded)  # passed on, for Dramatiq to see
    first.refresh_from_db()
    assert (first.status, first.error) == ("error", "the worker's time limit was reached")
    # The next case was promoted into the slot, and sent through the broker, not kept by
    # the interrupted thread.
    second = TestResult.objects.get(run=run, position=1)
    assert second.status == "running"
    assert Lease.objects.get(result=second).holder == ""
    run = run_here(run)
    assert (run.status, run.done_count) == ("error", 2)
    assert_every_slot_returned()


def test_a_shutdown_mid_case_puts_the_case_back_in_the_queue(fake_llm, provider, make_card):
    fake_llm.script([FakeReply(hang=True)])
    run = launching.launch_run(card=make_card(cases=1), provider=provider)
    admission.admit_cases(provider.pk)
    result = TestResult.objects.get(run=run)

    raised = run_in_thread_until_interrupted(result.pk, Shutdown, fake_llm)

    assert isinstance(raised, Shutdown)
    result.refresh_from_db()
    # Back in the queue and admitted again at once (the slot was free), for another worker.
    assert result.status == "running" and result.error == ""
    assert Lease.objects.get(result=result).holder == ""
    run = run_here(run)
    assert only_result(run).status == "passed" and run.status == "succeeded"
    assert_every_slot_returned()


# --- A real worker ----------------------------------------------------------------------------


def test_one_worker_thread_survives_every_bad_answer_and_goes_on(
    worker_factory, fake_llm, provider, make_card
):
    replies = {
        "html": FakeReply(raw=HTML),
        "nul": "nul \x00 here",
        "surrogate": "lone \ud800 here",
        "tokens": FakeReply(
            text="tokens fine", usage={"prompt_tokens": -3, "completion_tokens": 10**15}
        ),
        "huge": FakeReply(size=50 * MB, chunked=True),
        "hang": FakeReply(hang=True),
        "broken": "broken",
        "fine": "fine",
    }
    fake_llm.reply_with(lambda prompt: replies.get(prompt, f"echo: {prompt}"))
    card = make_card(cases=0, template="{{ name }}")
    for name in replies:
        assertions = [] if name != "broken" else [{"type": "contains", "value": "x"}]
        card.cases.create(name=name, variables={"name": name}, assertions=assertions)
    run = launching.launch_run(
        card=card, provider=provider, max_concurrent_tests=1, timeout_seconds=60, max_retries=0
    )
    TestResult.objects.filter(run=run, case_name="broken").update(assertions=7)
    # One thread: every case after a bad one is run by the thread that survived it. The time
    # limit is short, so that the hanging vendor runs into it long before the 60 s timeout.
    worker = worker_factory(processes=1, threads=1, env={"CASE_TIME_LIMIT_SECONDS": "4"})

    wait_for(lambda: TestRun.objects.get(pk=run.pk).is_finished, timeout=90, what="the run to end")

    results = {r.case_name: r for r in TestResult.objects.filter(run=run)}
    assert results["html"].status == "error" and "not a chat completion" in results["html"].error
    assert results["nul"].output == "nul \ufffd here" and results["nul"].status == "passed"
    assert results["surrogate"].output == "lone \ufffd here"
    assert results["tokens"].status == "passed" and results["tokens"].tokens_out < 100
    assert "larger than 4 MiB" in results["huge"].error
    assert results["hang"].error == "the worker's time limit was reached"
    assert results["broken"].error.startswith("unexpected error: TypeError")
    assert results["fine"].status == "passed"
    run.refresh_from_db()
    assert (run.status, run.done_count) == ("error", len(replies))
    wait_for(lambda: not Lease.objects.exists(), what="every lease to be gone")
    assert_every_slot_returned()

    # Still alive, and still taking cases.
    again = launching.launch_run(card=make_card(slug="again", cases=1), provider=provider)
    wait_for(
        lambda: TestRun.objects.get(pk=again.pk).is_finished,
        timeout=30,
        what="a run after all that",
    )
    assert TestRun.objects.get(pk=again.pk).status == "succeeded"
    assert worker.process.poll() is None


def test_threads_taking_their_first_cases_at_once_share_one_holder_id():
    """Two boot ids in one process made the boot's hand-back of "an earlier process with our
    pid" take a case from a sibling thread, which then ran twice."""
    script = (
        "import threading\n"
        "from testruns.engine import worker_identity\n"
        "start, ids = threading.Barrier(16), set()\n"
        "def take():\n"
        "    start.wait()\n"
        "    ids.add(worker_identity.holder_id())\n"
        "threads = [threading.Thread(target=take) for _ in range(16)]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "print(len(ids))\n"
    )
    for _ in range(10):  # a race: fresh processes, each with its first draw contended
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "1"
