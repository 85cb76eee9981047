"""Verdicts that know noise: whether a case got worse than its baseline beyond what chance
explains, and what that makes of the run. docs/statistics.md says it in plain words.

A case's evidence is its trials: the answers it got (each repeat of a pass^N run is one;
without repeats, one) and how many of them passed. Results that errored or were skipped carry
no evidence. Per case, against the baseline run:

- its pass rate, with a 95 % Wilson interval (`wilson`);
- Fisher's exact test, one-sided each way (`fisher_worse`, `fisher_better`): how likely a
  drop (or a rise) at least this large would be if both runs had the same true pass rate;
- `classify`: a regression or an improvement when that chance is below ALPHA; unchanged when
  the rates are equal, or differ by less than the test could have told apart from noise
  while it could have caught a real change of these sizes; "not enough evidence" when no
  outcome with these numbers of trials could have been significant (one trial against one:
  a single pass turning into a single failure proves nothing);
- flaky (`flaky_keys`): a case that flipped between passing and failing at least
  FLAKY_FLIPS times over the last FLAKY_RUNS completed runs of the same card, version and
  provider. A flaky case is shown apart and kept out of the run's verdict.

The run's verdict (`run_verdict`): a regression when any case that is not flaky regressed,
else an improvement when some improved, else no significant change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from django.db import connection

from testruns.live.snapshots import COMPLETED_RUNS
from testruns.models import TestRun

ALPHA = 0.05
Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval
FLAKY_RUNS = 10
FLAKY_FLIPS = 2


class Change(StrEnum):
    REGRESSION = "regression"
    IMPROVEMENT = "improvement"
    UNCHANGED = "unchanged"
    NO_EVIDENCE = "not enough evidence"


class RunVerdict(StrEnum):
    REGRESSION = "regression"
    IMPROVEMENT = "improvement"
    NO_CHANGE = "no significant change"


# --- The statistics ---------------------------------------------------------------------------


def wilson(passes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a pass rate: unlike passes/trials +- a normal margin it
    stays within 0..1 and is honest for few trials (1 of 1 passed: 0.21 to 1.0)."""
    if trials <= 0:
        return 0.0, 1.0
    rate = passes / trials
    denominator = 1 + z * z / trials
    centre = (rate + z * z / (2 * trials)) / denominator
    margin = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials))
    margin /= denominator
    return max(0.0, centre - margin), min(1.0, centre + margin)


def _hypergeometric(k: int, total: int, successes: int, draws: int) -> float:
    return (
        math.comb(successes, k) * math.comb(total - successes, draws - k) / math.comb(total, draws)
    )


def fisher_worse(before: tuple[int, int], after: tuple[int, int]) -> float:
    """One-sided Fisher's exact test: the chance, were both pass rates the same, that `after`
    (passes, trials) has this few passes or fewer, given the passes of both together."""
    (bp, bn), (ap, an) = before, after
    total, successes = bn + an, bp + ap
    low = max(0, an - (total - successes))
    return min(1.0, sum(_hypergeometric(k, total, successes, an) for k in range(low, ap + 1)))


def fisher_better(before: tuple[int, int], after: tuple[int, int]) -> float:
    """As fisher_worse, for a rise: the same test counted on failures."""
    (bp, bn), (ap, an) = before, after
    return fisher_worse((bn - bp, bn), (an - ap, an))


def classify(before: tuple[int, int], after: tuple[int, int], alpha: float = ALPHA) -> Change:
    """A case's change from `before` to `after`, each (passes, trials)."""
    (bp, bn), (ap, an) = before, after
    if bn <= 0 or an <= 0:
        return Change.NO_EVIDENCE
    if fisher_worse(before, after) < alpha:
        return Change.REGRESSION
    if fisher_better(before, after) < alpha:
        return Change.IMPROVEMENT
    if bp * an == ap * bn:
        return Change.UNCHANGED
    # The rates differ, within noise. Could these numbers of trials have shown a change at
    # all? The most extreme outcome in the observed direction says.
    if ap * bn < bp * an:
        strongest = fisher_worse(before, (0, an))
    else:
        strongest = fisher_better(before, (an, an))
    return Change.UNCHANGED if strongest < alpha else Change.NO_EVIDENCE


# --- Cases of two runs ------------------------------------------------------------------------

# A result's trials and passes: each repeat of a pass^N run is a trial, else the result is.
# Only passed and failed results carry evidence (an error is not an answer that was judged).
_TRIALS = (
    "CASE WHEN jsonb_typeof({t}.repeat_results) = 'array' "
    "AND jsonb_array_length({t}.repeat_results) > 0 "
    "THEN jsonb_array_length({t}.repeat_results) ELSE 1 END"
)
_PASSES = (
    "CASE WHEN jsonb_typeof({t}.repeat_results) = 'array' "
    "AND jsonb_array_length({t}.repeat_results) > 0 "
    "THEN {t}.repeat_passes ELSE ({t}.status = 'passed')::int END"
)
_KEY = "CASE WHEN {t}.case_id IS NOT NULL THEN 'c' || {t}.case_id ELSE 'n:' || {t}.case_name END"

# Cases of `run` with evidence in both runs whose pass rates differ, and those at
# `positions` (the page of cases shown) whatever they did; a case's last result by position
# in each run stands for it.
_PAIRS_SQL = f"""
WITH b AS (
    SELECT DISTINCT ON (key) key, trials, passes FROM (
        SELECT {_KEY.format(t="r")} AS key, r.position,
               {_TRIALS.format(t="r")} AS trials, {_PASSES.format(t="r")} AS passes
        FROM testruns_testresult r
        WHERE r.run_id = %(baseline)s AND r.status IN ('passed', 'failed')
    ) keyed ORDER BY key, position DESC
), a AS (
    SELECT DISTINCT ON (key) key, position, case_name, trials, passes FROM (
        SELECT {_KEY.format(t="r")} AS key, r.position, r.case_name,
               {_TRIALS.format(t="r")} AS trials, {_PASSES.format(t="r")} AS passes
        FROM testruns_testresult r
        WHERE r.run_id = %(run)s AND r.status IN ('passed', 'failed')
    ) keyed ORDER BY key, position DESC
)
SELECT a.key, a.position, a.case_name, b.passes, b.trials, a.passes, a.trials
FROM a JOIN b USING (key)
WHERE a.passes * b.trials <> b.passes * a.trials OR a.position = ANY(%(positions)s)
ORDER BY a.position
"""

# Outcomes (passed or not) of the given cases over the last runs of the same card, version
# and provider up to `run`, oldest first.
_HISTORY_SQL = f"""
WITH recent AS (
    SELECT id, queued_at FROM testruns_testrun
    WHERE card_id = %(card)s AND version_id = %(version)s AND provider_id = %(provider)s
      AND (status = ANY(%(completed)s) OR id = %(run)s) AND queued_at <= %(queued_at)s
    ORDER BY queued_at DESC, id DESC LIMIT %(runs)s
)
SELECT {_KEY.format(t="r")} AS key, r.status = 'passed'
FROM testruns_testresult r JOIN recent ON recent.id = r.run_id
WHERE r.status IN ('passed', 'failed') AND {_KEY.format(t="r")} = ANY(%(keys)s)
ORDER BY recent.queued_at, recent.id, r.position
"""


@dataclass
class CaseVerdict:
    key: str
    position: int
    case_name: str
    before: tuple[int, int]  # (passes, trials) in the baseline
    after: tuple[int, int]
    change: Change
    flaky: bool = False

    @property
    def interval_after(self) -> tuple[float, float]:
        return wilson(*self.after)

    @property
    def p_value(self) -> float:
        """The one-sided p of the direction the rate moved in."""
        if self.after[0] * self.before[1] < self.before[0] * self.after[1]:
            return fisher_worse(self.before, self.after)
        return fisher_better(self.before, self.after)


@dataclass
class Verdict:
    verdict: RunVerdict
    cases: list[CaseVerdict] = field(default_factory=list)  # every case whose rate moved
    by_position: dict[int, CaseVerdict] = field(default_factory=dict)  # incl. the page's

    def by_key(self) -> dict[str, CaseVerdict]:
        return {c.key: c for c in [*self.by_position.values(), *self.cases]}

    def of(self, change: Change) -> list[CaseVerdict]:
        return [c for c in self.cases if c.change == change and not c.flaky]

    @property
    def regressions(self) -> list[CaseVerdict]:
        return self.of(Change.REGRESSION)

    @property
    def improvements(self) -> list[CaseVerdict]:
        return self.of(Change.IMPROVEMENT)

    @property
    def no_evidence(self) -> list[CaseVerdict]:
        return self.of(Change.NO_EVIDENCE)

    @property
    def flaky(self) -> list[CaseVerdict]:
        return [c for c in self.cases if c.flaky]


def run_verdict(
    baseline: TestRun, run: TestRun, *, positions: list[int] | tuple[int, ...] = ()
) -> Verdict:
    """Every case of `run` whose pass rate moved from `baseline`'s, classified, flaky ones
    marked; and the cases at `positions` whatever they did (for a page of the report). Two
    queries, the second only over the cases that moved."""
    wanted = set(positions)
    with connection.cursor() as cursor:
        cursor.execute(
            _PAIRS_SQL, {"baseline": baseline.pk, "run": run.pk, "positions": list(wanted)}
        )
        rows = cursor.fetchall()
    every = [
        CaseVerdict(key, position, name, (bp, bn), (ap, an), classify((bp, bn), (ap, an)))
        for key, position, name, bp, bn, ap, an in rows
    ]
    moved = [c for c in every if c.before[0] * c.after[1] != c.after[0] * c.before[1]]
    flaky = flaky_keys(run, [c.key for c in moved])
    for case in every:
        case.flaky = case.key in flaky
    verdict = RunVerdict.NO_CHANGE
    if any(c.change == Change.REGRESSION and not c.flaky for c in moved):
        verdict = RunVerdict.REGRESSION
    elif any(c.change == Change.IMPROVEMENT and not c.flaky for c in moved):
        verdict = RunVerdict.IMPROVEMENT
    return Verdict(verdict, moved, {c.position: c for c in every if c.position in wanted})


def flaky_keys(run: TestRun, keys: list[str]) -> set[str]:
    """Those of `keys` whose outcome flipped at least FLAKY_FLIPS times over the last
    FLAKY_RUNS runs of `run`'s card, version and provider (`run` included)."""
    if not keys:
        return set()
    with connection.cursor() as cursor:
        cursor.execute(
            _HISTORY_SQL,
            {
                "card": run.card_id,
                "version": run.version_id,
                "provider": run.provider_id,
                "completed": list(COMPLETED_RUNS),
                "run": run.pk,
                "queued_at": run.queued_at,
                "runs": FLAKY_RUNS,
                "keys": keys,
            },
        )
        outcomes: dict[str, list[bool]] = {}
        for key, passed in cursor:
            outcomes.setdefault(key, []).append(passed)
    return {
        key
        for key, seen in outcomes.items()
        if sum(a != b for a, b in zip(seen, seen[1:], strict=False)) >= FLAKY_FLIPS
    }
