"""`manage.py run_card` as a CI pipeline runs it: a child process against the test database,
real Dramatiq workers, and the fake OpenAI-compatible server over HTTP."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from testruns.engine import gate, launching, limits
from testruns.models import Provider, TestCase, TestResult, TestRun
from testruns.reporting import terminal
from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
# A line as settings.LOGGING writes it: "2026-01-31 12:00:00,123 INFO logger message".
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ", re.MULTILINE)


@pytest.fixture
def fake_openai(fake_llm):
    return Provider.objects.create(
        name="fake-openai",
        kind=Provider.Kind.OPENAI,
        model="fake-1",
        base_url=fake_llm.base_url,
        timeout_seconds=30,
    )


def run_card(env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "run_card", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def junit_counts(path) -> tuple[int, int, int, list[str]]:
    suite = ET.parse(path).getroot().find("testsuite")
    messages = [failure.get("message") for failure in suite.iter("failure")]
    return int(suite.get("tests")), int(suite.get("failures")), int(suite.get("errors")), messages


def test_passing_card_exits_0_and_failing_card_exits_1_with_junit_reports(
    process_env, worker_factory, fake_openai, make_card, tmp_path
):
    make_card("passing", cases=3)
    failing = make_card("failing", cases=3)
    TestCase.objects.filter(card=failing, name="case 1").update(
        assertions=[{"type": "contains", "value": "never said"}]
    )
    worker_factory(processes=1, threads=4)

    passed = run_card(
        process_env,
        "passing",
        "--provider",
        "fake-openai",
        "--wait",
        "--junit",
        str(tmp_path / "passing.xml"),
        "--json",
        str(tmp_path / "passing.json"),
    )
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert junit_counts(tmp_path / "passing.xml") == (3, 0, 0, [])
    report = json.loads((tmp_path / "passing.json").read_text())
    assert report["pass_rate"] == 1.0
    assert [r["status"] for r in report["runs"][0]["results"]] == ["passed"] * 3
    assert "3/3 done, 3 passed, 0 failed, 0 error" in passed.stderr
    assert "pass rate 100.0%" in passed.stdout

    failed = run_card(
        process_env,
        "failing",
        "--provider",
        "fake-openai",
        "--junit",
        str(tmp_path / "failing.xml"),
    )
    assert failed.returncode == 1, failed.stdout + failed.stderr
    tests, failures, errors, messages = junit_counts(tmp_path / "failing.xml")
    assert (tests, failures, errors) == (3, 1, 0)
    assert "never said" in messages[0]
    assert "pass rate 66.7% (at least 100% needed): FAIL" in failed.stdout

    lenient = run_card(
        process_env, "failing", "--provider", "fake-openai", "--wait", "--fail-under", "60"
    )
    assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    assert TestRun.objects.filter(launched_by=None).count() == 3


def test_ctrl_c_while_waiting_cancels_the_run_and_exits_130(
    process_env, fake_openai, make_card, tmp_path
):
    card = make_card("waiting", cases=2)
    limits.ensure_semaphores(fake_openai)
    limits.set_limit(gate.RUNS, 1)
    blocker = launching.launch_run(card=card, provider=fake_openai)  # takes the only slot
    log_path = tmp_path / "stderr.log"
    with log_path.open("w") as log:
        child = subprocess.Popen(
            [sys.executable, "manage.py", "run_card", "waiting", "-p", "fake-openai", "--wait"],
            env=process_env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            wait_for(
                lambda: "#1 in queue" in log_path.read_text(),
                timeout=60,
                what="the queue position on stderr",
            )
            child.send_signal(signal.SIGINT)
            stdout, _ = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
    assert child.returncode == 130, log_path.read_text()
    run = TestRun.objects.exclude(pk=blocker.pk).get()
    assert run.status == TestRun.Status.CANCELLED
    assert f"Interrupted: cancelled run(s) #{run.pk}." in log_path.read_text()
    assert TestRun.objects.get(pk=blocker.pk).status == TestRun.Status.RUNNING


def test_a_full_queue_exits_75_and_queues_nothing(process_env, fake_openai, make_card):
    card = make_card("busy", cases=1)
    limits.ensure_semaphores(fake_openai)
    limits.set_limit(gate.RUNS, 0)
    launching.launch_run(card=card, provider=fake_openai)
    result = run_card(process_env | {"MAX_QUEUE_LENGTH": "1"}, "busy", "-p", "fake-openai")
    assert result.returncode == 75
    assert "The queue is full" in result.stderr
    assert TestRun.objects.count() == 1


def test_bad_arguments_exit_2_with_a_clear_message(process_env, fake_openai, make_card):
    make_card("card", cases=1)
    Provider.objects.create(name="second", kind="simulator", model="s")
    cases = [
        (["nope"], "No card with the slug 'nope'."),
        (["card"], "Choose the provider(s) with --provider: one of fake-openai, second."),
        (["card", "-p", "ghost"], "No provider named 'ghost'."),
        (["crad", "-p", "second"], "No card with the slug 'crad'. Did you mean 'card'?"),
        (["card", "-p", "Second"], "No provider named 'Second'. Did you mean 'second'?"),
        (
            ["card", "-p", "second", "--tag", "missing"],
            "Card has no enabled test case tagged missing.",
        ),
        (
            ["card", "-p", "second", "--fail-under", "120"],
            "--fail-under is a percentage from 0 to 100.",
        ),
    ]
    for args, message in cases:
        result = run_card(process_env, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    assert not TestRun.objects.exists()


def test_without_wait_it_prints_the_run_ids_and_exits_0(process_env, make_card, simulator):
    make_card("quick", cases=1)
    other = Provider.objects.create(name="other", kind="simulator", model="s")
    result = run_card(process_env, "quick", "-p", simulator.name, "-p", str(other.pk))
    assert result.returncode == 0, result.stderr
    ids = [int(pk) for pk in result.stdout.split()]
    runs = TestRun.objects.filter(pk__in=ids)
    assert {run.provider.name for run in runs} == {simulator.name, "other"}
    assert len({run.comparison_group for run in runs}) == 1


def test_a_failing_run_ends_with_its_failing_cases_and_report_url_and_no_log_lines(
    process_env, worker_factory, make_card, simulator
):
    card = make_card("refund-policy", cases=4)
    TestCase.objects.filter(card=card, name="case 1").update(
        name="a case whose name is far too long to be shown whole in a table",
        assertions=[{"type": "contains", "value": "never said " + "x" * 300}],
    )
    TestCase.objects.filter(card=card, name="case 2").update(variables={})  # a template error
    worker_factory(processes=1, threads=2)
    env = process_env | {"SITE_URL": "https://cards.example.com/", "COLUMNS": "100"}
    result = run_card(env, "refund-policy", "-p", "Test simulator", "--wait")
    assert result.returncode == 1, result.stdout + result.stderr
    run = TestRun.objects.get()
    summary, *table = result.stdout.splitlines()
    assert summary.startswith(
        f"run #{run.pk} refund-policy on Test simulator: error, 2 passed, 1 failed, 1 error"
    )
    assert table == [
        "  case                                      status  reason",
        "  a case whose name is far too long to ...  failed  "
        'contains: output does not contain "never said...',
        "  case 2                                    error   Template error: 'name' is undefined",
        f"  report: https://cards.example.com/runs/{run.pk}/report/",
        "pass rate 50.0% (at least 100% needed): FAIL",
    ]
    assert max(len(line) for line in table) == 100
    # No log line anywhere without -v 2 (the launch logs "run queued" at INFO).
    assert not LOG_LINE.search(result.stdout) and not LOG_LINE.search(result.stderr)

    verbose = run_card(env, "refund-policy", "-p", str(simulator.pk), "-v", "2")
    assert verbose.returncode == 0, verbose.stderr
    queued = TestRun.objects.exclude(pk=run.pk).get()
    assert verbose.stdout == f"{queued.pk}\n"  # stdout stays the result alone
    assert "INFO testruns.engine.launching run queued" in verbose.stderr


def test_the_failing_cases_table_shows_the_first_reason_and_says_how_many_more(
    make_card, simulator
):
    run = launching.launch_run(
        card=make_card(cases=terminal.MAX_FAILING_ROWS + 3), provider=simulator
    )
    results = list(run.results.order_by("position"))
    for result in results[1:]:
        result.status = TestResult.Status.FAILED
        result.assertion_results = [
            {"type": "contains", "passed": True, "reason": "fine"},
            {"type": "regex", "passed": False, "reason": "no match\nfor   ^N"},
            {"type": "equals", "passed": False, "reason": "not equal"},
        ]
        result.save()
    results[2].status, results[2].error = TestResult.Status.ERROR, "HTTP 500: " + "boom " * 50
    results[2].save()
    table = terminal.failing_cases_table(run, width=60)
    assert table[:4] == [
        "  case     status  reason",
        "  case 1   failed  regex: no match for ^N",
        "  case 2   error   HTTP 500: boom boom boom boom boom boo...",
        "  case 3   failed  regex: no match for ^N",
    ]
    assert len(table[2]) == 60
    assert len(table) == 1 + terminal.MAX_FAILING_ROWS + 1
    assert table[-1] == "  ... and 2 more failing case(s): see the report"
    assert (
        terminal.failing_cases_table(
            launching.launch_run(card=run.card, provider=simulator), width=60
        )
        == []
    )


def finished_baseline(card, provider, passes: int, trials: int) -> TestRun:
    """A finished run of `card` on `provider` whose one case passed `passes` of `trials`
    repeats: the baseline of the next run."""
    run = TestRun.objects.create(
        card=card, version=card.versions.get(), provider=provider, status="failed",
        phase="done", total_cases=1, done_count=1, repeats=trials,
    )  # fmt: skip
    case = card.cases.get()
    TestResult.objects.create(
        run=run, case=case, case_name=case.name, position=0,
        status="passed" if passes == trials else "failed", repeat_passes=passes,
        repeat_results=[{"passed": n < passes, "output": "x"} for n in range(trials)],
    )  # fmt: skip
    TestRun.objects.filter(pk=run.pk).update(finished_at=run.queued_at)
    return run


@pytest.mark.parametrize(
    ("baseline_passes", "failing_calls", "exit_code"),
    [(10, 8, 1), (9, 2, 0)],
    ids=["10-of-10-to-2-of-10-is-a-regression", "9-of-10-to-8-of-10-is-a-wobble"],
)
def test_fail_on_regression_exits_non_zero_on_a_regression_only(
    process_env, worker_factory, fake_openai, fake_llm, make_card,
    baseline_passes, failing_calls, exit_code,
):  # fmt: skip
    card = make_card("noisy", cases=1)
    finished_baseline(card, fake_openai, baseline_passes, 10)
    answers = iter(["nothing"] * failing_calls + ["N0"] * (10 - failing_calls))
    fake_llm.reply_with(lambda prompt: next(answers))
    worker_factory(processes=1, threads=1)

    result = run_card(
        process_env, "noisy", "-p", "fake-openai", "--repeats", "10", "--wait",
        "--fail-on", "regression",
    )  # fmt: skip

    assert result.returncode == exit_code, result.stdout + result.stderr
    run = TestRun.objects.latest("pk")
    assert run.status == "failed"  # pass^10 failed either way: the pass rate alone would fail
    if exit_code:
        assert "regressed on case 0: 10/10 -> 2/10 passed" in result.stderr
        assert result.stdout.rstrip().endswith(
            f"regression against the baseline: run #{run.pk}: FAIL"
        )
    else:
        assert result.stdout.rstrip().endswith("regression against the baseline: none: PASS")
