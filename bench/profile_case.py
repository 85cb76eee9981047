"""Where a worker's CPU per case goes: N cases of a zero-latency simulator run in this
process as a worker thread runs them (claim, render, call, check, record, hand on), under
cProfile. Prints the functions with the most time of their own, and the cumulative view.

    .venv/bin/python -m project.stack exec -- .venv/bin/python bench/profile_case.py

Not a test; figures go to docs/benchmarks.md ("Where a case's CPU goes").
"""

from __future__ import annotations

import cProfile
import os
import pstats
import time

import django_env  # noqa: I001 (first: the settings and the path)

django_env.setup()
ROOT = django_env.ROOT

from django.core.management import call_command

from bench.engine_bench import make_card, reset
from testruns.engine import admission, execution, launching, limits
from testruns.models import Provider, TestResult

CASES = int(os.environ.get("PROFILE_CASES", "2000"))


def main() -> None:
    call_command("migrate", verbosity=0)
    reset()
    provider = Provider.objects.create(
        name="sim0",
        kind="simulator",
        max_concurrency=1,
        parameters={"latency_ms": 0, "jitter_ms": 0, "error_rate": 0},
    )
    limits.ensure_semaphores(provider)
    run = launching.launch_run(card=make_card(CASES), provider=provider, max_concurrent_tests=1)
    admission.admit_runs()
    first = TestResult.objects.get(run=run, status="running").pk
    profile = cProfile.Profile()
    started = time.process_time()
    profile.enable()
    # One thread handing each case on to itself, as a worker thread does (no broker).
    execution.run_admitted_case(first, "profile:1", keep_going=lambda: True)
    while pending := list(
        TestResult.objects.filter(run=run, status="running").values_list("pk", flat=True)
    ):
        for result_id in pending:
            execution.run_admitted_case(result_id, "profile:1", keep_going=lambda: True)
    profile.disable()
    cpu = time.process_time() - started
    done = TestResult.objects.filter(run=run).exclude(status="running").count()
    print(f"{done} cases, {1000 * cpu / done:.2f} ms CPU per case in this process\n")
    stats = pstats.Stats(profile).strip_dirs()
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
