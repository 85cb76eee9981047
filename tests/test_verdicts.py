"""Verdicts that know noise (issue 16), on constructed histories: a real regression is called
one, a wobble is not, a single pass turning into a single failure is not enough evidence, a
case that keeps flipping is flaky and kept out of the run's verdict."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from testruns.models import TestResult, TestRun
from testruns.reporting import verdicts
from testruns.reporting.verdicts import Change, RunVerdict


def test_wilson_intervals_stay_within_zero_and_one_and_are_wide_for_few_trials():
    assert verdicts.wilson(1, 1) == pytest.approx((0.2065, 1.0), abs=1e-3)
    assert verdicts.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-3)
    low, high = verdicts.wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert verdicts.wilson(0, 0) == (0.0, 1.0)


def test_fisher_matches_the_exact_hypergeometric_tail():
    # 10/10 then 2/10: 12 passes of 20; P(the second run got 2 or fewer of them).
    assert verdicts.fisher_worse((10, 10), (2, 10)) == pytest.approx(0.000357, rel=1e-2)
    assert verdicts.fisher_worse((9, 10), (8, 10)) == pytest.approx(0.5, abs=1e-9)
    assert verdicts.fisher_better((2, 10), (10, 10)) == pytest.approx(0.000357, rel=1e-2)
    assert verdicts.fisher_worse((1, 1), (0, 1)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("before", "after", "change"),
    [
        ((10, 10), (2, 10), Change.REGRESSION),
        ((9, 10), (8, 10), Change.UNCHANGED),  # a wobble the test could tell from a drop
        ((5, 5), (5, 5), Change.UNCHANGED),
        ((2, 10), (10, 10), Change.IMPROVEMENT),
        ((1, 1), (0, 1), Change.NO_EVIDENCE),  # no outcome of 1 trial could have proved it
        ((3, 3), (1, 3), Change.NO_EVIDENCE),
        ((20, 20), (0, 1), Change.REGRESSION),  # a long clean record, then a failure
    ],
)
def test_a_case_is_classified_by_what_chance_explains(before, after, change):
    assert verdicts.classify(before, after) == change


# --- On runs in the database ------------------------------------------------------------------


@pytest.fixture
def history(db, make_card, simulator, user):
    """make(outcomes per case) -> a finished run of the card on the simulator, one result per
    case: True/False for one trial, or (passes, trials) for a pass^N case; runs a minute
    apart, oldest first."""
    card = make_card("noisy", cases=0)
    for i in range(3):
        card.cases.create(name=f"case {i}", variables={"name": f"N{i}"}, order=i)
    cases = list(card.cases.order_by("order"))
    version = card.versions.get()
    made: list[TestRun] = []

    def make(*outcomes) -> TestRun:
        now = timezone.now() - timedelta(minutes=100 - len(made))
        run = TestRun.objects.create(
            card=card, version=version, provider=simulator, launched_by=user,
            status="succeeded", phase="done", total_cases=len(outcomes),
            done_count=len(outcomes), repeats=10,
        )  # fmt: skip
        TestRun.objects.filter(pk=run.pk).update(queued_at=now, finished_at=now)
        for case, outcome in zip(cases, outcomes, strict=False):
            passes, trials = (int(outcome), 1) if isinstance(outcome, bool) else outcome
            repeats = [{"passed": n < passes, "output": "x"} for n in range(trials)]
            TestResult.objects.create(
                run=run, case=case, case_name=case.name, position=case.order,
                status="passed" if passes == trials else "failed",
                repeat_results=repeats if trials > 1 else [], repeat_passes=passes,
            )  # fmt: skip
        run.refresh_from_db()
        made.append(run)
        return run

    return make


def test_a_real_regression_makes_the_run_a_regression(history):
    baseline = history((10, 10), (10, 10), (7, 10))
    run = history((2, 10), (10, 10), (7, 10))

    verdict = verdicts.run_verdict(baseline, run)

    assert verdict.verdict == RunVerdict.REGRESSION
    assert [(c.case_name, c.change) for c in verdict.cases] == [("case 0", Change.REGRESSION)]
    assert verdict.cases[0].p_value < 0.001


def test_a_wobble_is_no_regression(history):
    baseline = history((9, 10), (10, 10), (10, 10))
    run = history((8, 10), (10, 10), (9, 10))

    verdict = verdicts.run_verdict(baseline, run, positions=[0, 1])

    assert verdict.verdict == RunVerdict.NO_CHANGE
    assert {c.case_name: c.change for c in verdict.cases} == {
        "case 0": Change.UNCHANGED,
        "case 2": Change.UNCHANGED,
    }
    assert verdict.by_position[1].change == Change.UNCHANGED  # the page's unchanged case too


def test_one_trial_each_is_not_enough_evidence(history):
    baseline = history(True, True, True)
    run = history(False, True, True)

    verdict = verdicts.run_verdict(baseline, run)

    assert verdict.verdict == RunVerdict.NO_CHANGE
    assert [c.change for c in verdict.no_evidence] == [Change.NO_EVIDENCE]


def test_a_case_that_keeps_flipping_is_flaky_and_kept_out_of_the_verdict(history):
    for passed in (True, False, True, False):
        history(passed, (10, 10), True)
    baseline = history((10, 10), (10, 10), True)
    run = history((0, 10), (10, 10), True)  # case 0 flipped again; as a case it regressed

    verdict = verdicts.run_verdict(baseline, run)

    assert [c.case_name for c in verdict.flaky] == ["case 0"]
    assert verdict.flaky[0].change == Change.REGRESSION
    assert verdict.regressions == []
    assert verdict.verdict == RunVerdict.NO_CHANGE


def test_a_case_that_failed_once_is_not_flaky(history):
    for _ in range(4):
        history((10, 10), True, True)
    baseline = history((10, 10), True, True)
    run = history((1, 10), True, True)

    verdict = verdicts.run_verdict(baseline, run)

    assert verdict.flaky == [] and verdict.verdict == RunVerdict.REGRESSION
