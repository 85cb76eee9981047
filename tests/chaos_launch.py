"""Launch the chaos suite's runs in the database a chaos test started (run in a process of
its own, with that test's DATABASE_URL and REDIS_URL): one provider on the fake vendor, one
card with N cases, M runs through the launch service. Prints the run ids as JSON.

    python -m tests.chaos_launch --vendor http://127.0.0.1:PORT/v1 --runs 20 --cases 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import django


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vendor", required=True)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--provider-limit", type=int, default=4)
    parser.add_argument("--run-limit", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--per-run", type=int, default=2)
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    django.setup()
    # Imported after django.setup(): they import models.
    from testruns.engine import gate, launching, limits
    from testruns.models import PromptCard, Provider, TestCase

    provider = Provider.objects.create(
        name="Chaos vendor",
        kind=Provider.Kind.OPENAI,
        model="fake-1",
        base_url=args.vendor,
        max_concurrency=args.provider_limit,
        timeout_seconds=args.timeout,
    )
    card = PromptCard.objects.create(name="Chaos", slug="chaos", template="Echo {{ word }}.")
    for i in range(args.cases):
        TestCase.objects.create(
            card=card,
            name=f"case {i}",
            variables={"word": f"w{i}"},
            assertions=[{"type": "contains", "value": f"w{i}"}],
            order=i,
        )
    limits.ensure_semaphores(provider)
    limits.set_limit(gate.RUNS, args.run_limit)
    runs = [
        launching.launch_run(
            card=card,
            provider=provider,
            timeout_seconds=args.timeout,
            max_retries=args.retries,
            max_concurrent_tests=args.per_run,
        )
        for _ in range(args.runs)
    ]
    json.dump({"runs": [run.pk for run in runs], "provider": provider.pk}, sys.stdout)


if __name__ == "__main__":
    main()
