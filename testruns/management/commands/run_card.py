"""`manage.py run_card CARD`: test a prompt card from a CI pipeline.

Queues one run per provider through the same gate as the pages and the API, and with --wait
follows them (a progress line on stderr), writes JUnit XML and JSON reports, prints per run
a summary, a short table of its failing cases with their first reason and its report's URL,
and exits 0 only when the pass rate reaches --fail-under (or, with --fail-on regression,
when no run regressed against its baseline beyond chance). Exit codes: 0 pass, 1 below the bar
(or --timeout), 2 bad arguments, 75 queue full (try again later), 130 Ctrl-C and 143 SIGTERM
(both cancel the runs first).

Cards and providers are found as the API finds them (catalog.lookup): a slug / name or an id.
stdout carries only results (run ids, or the summaries); progress and notes go to stderr,
and log lines only with -v 2 (on stderr, like every log line).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.management.base import BaseCommand, CommandError

from testruns.catalog import lookup
from testruns.engine import launching, run_settings
from testruns.live import snapshots
from testruns.models import PromptCard, Provider, TestRun
from testruns.reporting import formats, terminal
from testruns.reporting.terminal import (
    failing_cases_table,
    live_url,
    progress_text,
    report_url,
    summary_line,
    table_width,
)

EX_USAGE = 2
# The run settings this command sets: TestRun's field -> (option, its dest). Their defaults
# and bounds are the model's (engine.run_settings), as on the launch page and in the API.
SETTING_OPTIONS = {
    "max_concurrent_tests": ("--max-concurrent", "max_concurrent"),
    "timeout_seconds": ("--case-timeout", "case_timeout"),
    "max_retries": ("--max-retries", "max_retries"),
    "repeats": ("--repeats", "repeats"),
    "priority": ("--priority", "priority"),
}
EX_TEMPFAIL = 75  # sysexits.h: "temporary failure", e.g. a full queue


class Command(BaseCommand):
    help = (
        "Queue runs of a card (one per --provider) and, with --wait, follow them and exit "
        "0 only when the pass rate meets --fail-under."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("card", metavar="CARD", help="The card's slug (or id).")
        parser.add_argument(
            "--provider",
            "-p",
            action="append",
            default=[],
            metavar="P",
            help="A provider's name (or id); repeat for one run per provider. "
            "Default: the only enabled provider.",
        )
        parser.add_argument(
            "--tag",
            "-t",
            action="append",
            default=[],
            metavar="T",
            help="Only enabled cases with this tag; repeat for any of several.",
        )
        parser.add_argument(
            "--case",
            action="append",
            type=int,
            default=[],
            metavar="ID",
            help="Only the test case with this id (even if disabled); repeat for several.",
        )
        # Not --version: every Django command has that one (it prints Django's version).
        parser.add_argument(
            "--prompt-version",
            type=int,
            metavar="N",
            help="Run the card's version N (v1, v2, ... as runs show it). Default: the latest.",
        )
        parser.add_argument(
            "--wait",
            action="store_true",
            help="Follow the runs until they finish (implied by --junit, --json and --timeout).",
        )
        parser.add_argument("--junit", metavar="FILE", help="Write a JUnit XML report.")
        parser.add_argument("--json", metavar="FILE", help="Write a JSON report.")
        parser.add_argument(
            "--fail-under",
            type=float,
            default=100.0,
            metavar="PCT",
            help="Lowest pass rate, in percent, that exits 0 (default 100).",
        )
        parser.add_argument(
            "--fail-on",
            choices=["pass-rate", "regression"],
            default="pass-rate",
            help="What exits non-zero: a pass rate below --fail-under (default), or a "
            "regression against each run's baseline that chance does not explain "
            "(docs/statistics.md); a run without a baseline cannot regress.",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            metavar="SECONDS",
            help="Stop waiting after this long: cancel the runs and exit 1.",
        )
        add_setting(parser, "priority", type=int, metavar="P", help="Higher runs first")
        add_setting(
            parser,
            "max_concurrent_tests",
            type=int,
            metavar="N",
            help="Cases of one run in flight at once",
        )
        add_setting(
            parser,
            "timeout_seconds",
            type=float,
            metavar="SECONDS",
            help="Timeout of one provider call",
        )
        add_setting(
            parser,
            "max_retries",
            type=int,
            metavar="N",
            help="Retries of a call after 429, 5xx or a network error",
        )
        parser.add_argument("--stop-on-failure", action="store_true")
        parser.add_argument("--cache", action="store_true", help="Use the response cache.")
        add_setting(
            parser,
            "repeats",
            type=int,
            metavar="N",
            help="Times each case asks the model; it passes when every repeat passes",
        )
        parser.add_argument("--user", metavar="USERNAME", help="Launch as this user.")
        parser.add_argument("--poll-interval", type=float, default=0.5, metavar="SECONDS")

    def handle(self, *args, **options) -> None:
        with log_lines_for(options["verbosity"]):
            self.launch_and_follow(options)

    def launch_and_follow(self, options: dict) -> None:
        """1. Find the card, providers and user; check the options.
        2. Queue one run per provider, all or none (a full queue exits 75).
        3. Without waiting, print the run ids and stop. Otherwise follow the runs, cancelling
           them on Ctrl-C, SIGTERM or --timeout; write the reports; print the summaries, the
           failing cases and the report URLs; exit by the pass rate."""
        self.stderr.style_func = None  # progress is not an error: no red
        card = find_card(options["card"])
        providers = find_providers(options["provider"])
        user = find_user(options["user"])
        check_options(options)
        try:
            runs = launching.launch_runs(
                cards=[card],
                providers=providers,
                user=user,
                version=options["prompt_version"],
                case_ids=options["case"] or None,
                tags=options["tag"] or None,
                priority=options["priority"],
                max_concurrent_tests=options["max_concurrent"],
                timeout_seconds=options["case_timeout"],
                max_retries=options["max_retries"],
                stop_on_failure=options["stop_on_failure"],
                use_cache=options["cache"],
                repeats=options["repeats"],
            )
        except launching.QueueFull as exc:
            raise CommandError(str(exc), returncode=EX_TEMPFAIL) from None
        except launching.LaunchError as exc:
            raise CommandError(str(exc), returncode=EX_USAGE) from None
        for run in runs:
            self.stderr.write(
                f"Queued run #{run.pk}: {card.slug} on {run.provider.name} "
                f"({run.total_cases} cases) {live_url(run)}"
            )
        if not (options["wait"] or options["junit"] or options["json"] or options["timeout"]):
            self.stdout.write(" ".join(str(run.pk) for run in runs))
            return
        code = self.follow(runs, options)
        if code:
            sys.exit(code)

    def follow(self, runs: list[TestRun], options: dict) -> int:
        watcher = RunWatcher(runs, self.stderr, poll_interval=options["poll_interval"])
        reason = watcher.wait(timeout=options["timeout"])
        if reason is not None:
            cancelled = [run.pk for run in watcher.runs if launching.cancel_run(run)]
            watcher.finish_line()
            self.stderr.write(
                f"{reason}: cancelled run(s) {', '.join(f'#{pk}' for pk in cancelled) or 'none'}."
            )
        finished = watcher.refresh()
        self.write_reports(finished, options)
        rate = formats.pass_rate(finished)
        width = table_width()
        for run in finished:
            self.stdout.write(summary_line(run))
            for line in failing_cases_table(run, width=width):
                self.stdout.write(line)
            self.stdout.write(f"  report: {report_url(run)}")
        percent = 100 * rate if rate is not None else 0.0
        if options["fail_on"] == "regression":
            regressed = []
            for run in finished:
                found, lines = terminal.regressions(run)
                regressed += [run] if found else []
                for line in lines:
                    self.stderr.write(line)
            verdict = "FAIL" if regressed else "PASS"
            self.stdout.write(
                f"pass rate {percent:.1f}%; regression against the baseline: "
                + (", ".join(f"run #{run.pk}" for run in regressed) or "none")
                + f": {verdict}"
            )
        else:
            verdict = "PASS" if percent >= options["fail_under"] else "FAIL"
            self.stdout.write(
                f"pass rate {percent:.1f}% (at least {options['fail_under']:g}% needed): {verdict}"
            )
        if reason is not None:
            return watcher.exit_code or 1
        return 0 if verdict == "PASS" else 1

    def write_reports(self, runs: list[TestRun], options: dict) -> None:
        if options["junit"]:
            Path(options["junit"]).write_text(
                formats.junit_xml_of_runs(runs, name=runs[0].card.slug), encoding="utf-8"
            )
            self.stderr.write(f"JUnit report: {options['junit']}")
        if options["json"]:
            rate = formats.pass_rate(runs)
            document = {
                "pass_rate": rate,
                "fail_under": options["fail_under"] / 100,
                "runs": [formats.run_json(run) for run in runs],
            }
            Path(options["json"]).write_text(
                json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
            self.stderr.write(f"JSON report: {options['json']}")


def add_setting(parser, name: str, *, help: str, **kwargs) -> None:
    """An option for run setting `name`, with the model field's default and bounds."""
    flag, dest = SETTING_OPTIONS[name]
    bounds = run_settings.bounds(name)
    default = run_settings.default(name)
    parser.add_argument(
        flag,
        dest=dest,
        default=default,
        help=f"{help} (default {default:g}; {bounds.min_value:g} to {bounds.max_value:g}).",
        **kwargs,
    )


def find_card(key: str) -> PromptCard:
    try:
        return lookup.resolve_one(lookup.CARD, key)
    except lookup.UnknownReference as exc:
        raise CommandError(str(exc), returncode=EX_USAGE) from None


def find_providers(keys: list[str]) -> list[Provider]:
    """The named providers, or the only enabled one when none is named."""
    if not keys:
        enabled = list(Provider.objects.filter(enabled=True)[:2])
        if len(enabled) == 1:
            return enabled
        names = ", ".join(Provider.objects.filter(enabled=True).values_list("name", flat=True))
        raise CommandError(
            "Choose the provider(s) with --provider: "
            + (f"one of {names}." if names else "none is enabled."),
            returncode=EX_USAGE,
        )
    try:
        providers = lookup.resolve(lookup.PROVIDER, keys)
    except lookup.UnknownReference as exc:
        raise CommandError(str(exc), returncode=EX_USAGE) from None
    return list(dict.fromkeys(providers))  # a provider named twice (by name and id) runs once


def find_user(username: str | None) -> AbstractBaseUser | None:
    if username is None:
        return None
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise CommandError(f"No user named {username!r}.", returncode=EX_USAGE)
    return user


def check_options(options: dict) -> None:
    problems = []
    if not 0 <= options["fail_under"] <= 100:
        problems.append("--fail-under is a percentage from 0 to 100.")
    if options["timeout"] is not None and options["timeout"] <= 0:
        problems.append("--timeout must be positive.")
    if options["poll_interval"] <= 0:
        problems.append("--poll-interval must be positive.")
    # The run settings' bounds are the model's, refused in its validators' words.
    for name, (flag, dest) in SETTING_OPTIONS.items():
        problems.extend(
            f"{flag}: {message}" for message in run_settings.setting_errors(name, options[dest])
        )
    if problems:
        raise CommandError(" ".join(problems), returncode=EX_USAGE)


@contextmanager
def log_lines_for(verbosity: int) -> Iterator[None]:
    """Below -v 2, no INFO log lines (e.g. "run queued"): the command says what matters
    itself, and a CI log should start with it. Warnings and errors still show. Every log
    handler writes to stderr (settings.LOGGING), so stdout stays the results alone."""
    if verbosity >= 2:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)  # call_command in a longer-lived process (the tests)


class RunWatcher:
    """Polls the runs in the database until they finish, showing one progress line. On a
    terminal the line is rewritten in place (\\r); in a CI log a new line is written only
    when it changes. SIGINT and SIGTERM set a flag that ends the wait (the runs are then
    cancelled by the caller), so no query is ever cut off half-way."""

    def __init__(self, runs: list[TestRun], stream, *, poll_interval: float):
        self.ids = [run.pk for run in runs]
        self.runs = runs
        self.stream = stream
        self.poll_interval = poll_interval
        self.interactive = stream.isatty()
        self.stop = threading.Event()
        self.exit_code: int | None = None
        self.last_line = ""

    def refresh(self) -> list[TestRun]:
        by_id = {
            run.pk: run
            for run in TestRun.objects.filter(pk__in=self.ids).select_related(
                "card", "provider", "version"
            )
        }
        self.runs = [by_id[pk] for pk in self.ids]
        return self.runs

    def wait(self, *, timeout: float | None) -> str | None:
        """Until every run has finished (None) or why the wait ended early."""
        deadline = time.monotonic() + timeout if timeout else None
        previous = {
            sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            while True:
                runs = self.refresh()
                self.show(runs)
                if all(run.is_finished for run in runs):
                    self.finish_line()
                    return None
                if deadline is not None and time.monotonic() >= deadline:
                    self.exit_code = 1
                    return f"Timed out after {timeout:g}s"
                if self.stop.wait(self.poll_interval):
                    return "Interrupted"
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def on_signal(self, signum: int, frame) -> None:
        self.exit_code = 128 + signum
        self.stop.set()

    def show(self, runs: list[TestRun]) -> None:
        positions: dict[int, int] = {}
        if any(run.status == TestRun.Status.QUEUED for run in runs):
            queue = snapshots.queue_state()
            positions = {run.pk: snapshots.position_in(queue, run.pk) for run in runs}
        line = " | ".join(progress_text(run, positions.get(run.pk)) for run in runs)
        if line == self.last_line:
            return
        if self.interactive:
            padding = " " * max(0, len(self.last_line) - len(line))
            self.stream.write(f"\r{line}{padding}", ending="")
            self.stream.flush()
        else:
            self.stream.write(line)
        self.last_line = line

    def finish_line(self) -> None:
        if self.interactive and self.last_line:
            self.stream.write("")
