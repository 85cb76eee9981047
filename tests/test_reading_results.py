"""Reading results (issue 12): a run with repeats makes progress with every model call, not
every case; retries are kept apart from repeats (per result and per repeat); and the report
shows each case's detail: the rendered system prompt and prompt, its variables, the whole
output, every assertion and every repeat with its own verdict, retries, latency, tokens and
cost. Cases run in this process against the fake vendor over real HTTP and the real
PostgreSQL."""

from __future__ import annotations

import pytest
from django.db import connections
from django.urls import reverse

from testruns.engine import launching
from testruns.models import Provider, TestRun
from testruns.reporting import terminal
from tests.conftest import run_in_this_thread
from tests.fake_llm import FakeReply

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def provider(fake_llm):
    return Provider.objects.create(
        name="fake",
        kind="openai",
        model="gen-model",
        base_url=fake_llm.base_url,
        max_concurrency=4,
        timeout_seconds=10,
        price_input_per_mtok=3,
        price_output_per_mtok=15,
    )


def calls_done_now(run_id: int) -> int:
    """The run's calls as another connection sees them (what a page polling would read)."""
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT calls_done FROM testruns_testrun WHERE id = %s", [run_id])
            return cursor.fetchone()[0]
    finally:
        other.close()


def test_progress_moves_with_every_call_of_a_run_with_repeats(fake_llm, provider, make_card):
    run = launching.launch_run(card=make_card(cases=2), provider=provider, repeats=4)
    assert run.calls_total == 8
    seen: list[int] = []

    def answer(prompt: str) -> str:
        seen.append(calls_done_now(run.pk))  # what the page could show when this call began
        return prompt

    fake_llm.reply_with(answer)
    run_in_this_thread(run)

    run.refresh_from_db()
    assert (run.status, run.calls_done, run.progress_percent) == ("succeeded", 8, 100)
    # Before each call, every earlier call of the run was counted: the page moved by one
    # call at a time, not by four at the end of each case.
    assert seen == list(range(8))


def test_a_run_with_repeats_that_ends_early_still_counts_every_call_it_stood_for(
    fake_llm, provider, make_card
):
    card = make_card(cases=3)
    run = launching.launch_run(card=card, provider=provider, repeats=3, stop_on_failure=True)
    fake_llm.reply_with(lambda prompt: "nothing to see")  # the first case fails, the rest skip
    run_in_this_thread(run)
    run.refresh_from_db()
    assert run.status == "failed" and run.calls_done == run.calls_total == 9


def test_retries_are_kept_apart_from_repeats(fake_llm, provider, make_card):
    run = launching.launch_run(card=make_card(cases=1), provider=provider, repeats=3, max_retries=2)
    # Repeat 1 answers at once; repeat 2 after one 500; repeat 3 after two.
    fake_llm.script(
        [
            FakeReply(),
            FakeReply(status=500),
            FakeReply(),
            FakeReply(status=500),
            FakeReply(status=503),
            FakeReply(),
        ]
    )
    run_in_this_thread(run)
    result = run.results.get()
    assert (result.status, result.attempts, result.retries) == ("passed", 6, 3)
    assert [r["attempts"] for r in result.repeat_results] == [1, 2, 3]


def test_the_report_shows_a_cases_detail(fake_llm, provider, make_card, client, launcher):
    card = make_card(cases=1, system_prompt="You greet <people>.", template="Hi {{ name }}!")
    run = launching.launch_run(
        card=card, provider=provider, repeats=2, max_retries=1, user=launcher
    )
    fake_llm.script([FakeReply(text="Hello <b>N0</b>"), FakeReply(status=500)])
    fake_llm.reply_with(lambda prompt: "bye")
    run_in_this_thread(run)
    result = run.results.get()
    assert result.status == "failed" and result.retries == 1
    client.force_login(launcher)

    page = client.get(reverse("report", args=[run.pk])).content.decode()

    detail = page[page.index(f'id="case-{result.position}-detail"') :]
    detail = detail[: detail.index("</details>", detail.index('class="repeat-list"'))]
    assert "You greet &lt;people&gt;." in detail  # the rendered system prompt, escaped
    assert "Hi N0!" in detail  # the rendered prompt
    assert "&quot;name&quot;: &quot;N0&quot;" in detail  # the variables
    assert "Hello &lt;b&gt;N0&lt;/b&gt;" in detail and "<b>N0</b>" not in detail
    assert "2 model calls, 1 retry" in detail
    assert "Repeat 1 ✓" in page and "Repeat 2 ✗" in page
    assert "1/2 passed, 0.09–0.91" in page  # its pass rate over the repeats, with its interval
    assert 'data-copy="output"' in detail  # the output can be copied whole
    assert TestRun.objects.get(pk=run.pk).status == "failed"


def test_the_live_page_fetches_a_cases_detail_for_its_own_runs_only(
    fake_llm, provider, make_card, client, launcher, django_user_model
):
    card = make_card(cases=1, system_prompt="Be <kind>.")
    run = launching.launch_run(card=card, provider=provider, user=launcher)
    fake_llm.reply_with(lambda prompt: "<script>alert(1)</script> N0")
    run_in_this_thread(run)
    url = reverse("result-detail", args=[run.pk, 0])
    client.force_login(launcher)

    fragment = client.get(url).content.decode()
    assert fragment.lstrip().startswith('<details class="case-detail" id="case-0-detail" open>')
    assert "Be &lt;kind&gt;." in fragment
    assert "&lt;script&gt;alert(1)&lt;/script&gt; N0" in fragment and "<script>" not in fragment
    assert client.get(reverse("result-detail", args=[run.pk, 7])).status_code == 404

    client.force_login(django_user_model.objects.create_user("mallory", password="m-pass-123"))
    assert client.get(url).status_code == 404


def test_history_charts_label_the_x_axis_and_say_everything_about_a_run_on_hover(
    simulator, make_card, client, launcher
):
    card = make_card(cases=2)
    for statuses in (["passed", "failed"], ["passed", "passed"]):
        run = launching.launch_run(card=card, provider=simulator, user=launcher)
        run_in_this_thread(run)
        run.results.update(status=statuses[0])
        run.results.filter(position=1).update(status=statuses[1])
        TestRun.objects.filter(pk=run.pk).update(
            passed_count=statuses.count("passed"), failed_count=statuses.count("failed")
        )
    client.force_login(launcher)

    html = client.get(reverse("history"), {"card": card.pk}).content.decode()

    assert html.count('class="tick x-tick"') == 2  # both runs' finish times on the x axis
    assert html.count('class="run-band"') == 2
    assert "Pass rate: 50 %" in html and "Pass rate: 100 %" in html
    assert "p95 latency:" in html and "(click for the report)" in html


def test_the_cli_progress_bar_moves_in_calls(simulator, make_card):
    run = launching.launch_run(card=make_card(cases=2), provider=simulator, repeats=5)
    TestRun.objects.filter(pk=run.pk).update(status="running", calls_done=5)
    run.refresh_from_db()
    assert terminal.progress_text(run, None) == (
        f"run #{run.pk} [##########----------] 0/2 done (5/10 calls), 0 passed, 0 failed, 0 error"
    )
