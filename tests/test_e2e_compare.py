"""Comparing versions in a real browser (issue 12): runs picked with the history's checkboxes,
"Compare selected", the prompt diff at the top, word diffs of the outputs, "differences only",
a column following its run live, and a version's page. Runs execute in this process against
the simulator (real PostgreSQL, Redis and daphne), in a thread of their own: Playwright keeps
an event loop on the test's thread, on which the run's events could not be published."""

from __future__ import annotations

import re
import threading

import pytest
from django.contrib.auth.models import Permission
from django.db import connections

from testruns.catalog.cards import save_card
from testruns.engine import launching
from testruns.models import PromptCard, TestCase, TestRun
from tests.browser import log_in, screenshot, simulated
from tests.conftest import run_in_this_thread

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]


def run_elsewhere(run: TestRun) -> threading.Thread:
    """Execute the run's cases in another thread, as a worker would; join it to wait."""

    def execute() -> None:
        try:
            run_in_this_thread(run)
        finally:
            connections.close_all()  # this thread's own connection, not left open

    thread = threading.Thread(target=execute, daemon=True)
    thread.start()
    return thread


def run_to_the_end(run: TestRun) -> TestRun:
    run_elsewhere(run).join(timeout=60)
    run.refresh_from_db()
    assert run.is_finished, run.status
    return run


@pytest.fixture
def greeter(make_card, launcher) -> PromptCard:
    """v1 greets names as written; v2 capitalises them (and is kinder in its system prompt),
    which changes the answer for "ada lovelace" only."""
    card = make_card("greeter", cases=0, system_prompt="Be brief.", template="Hello {{ name }}!")
    for order, name in enumerate(["ada lovelace", "Grace Hopper"]):
        TestCase.objects.create(
            card=card,
            name=name,
            order=order,
            variables={"name": name},
            assertions=[{"type": "contains", "value": name.title()}],
        )
    return card


def new_version(card: PromptCard, user) -> None:
    card.system_prompt = "Be brief and kind."
    card.template = "Hello {{ name|title }}!"
    save_card(card, user=user, note="Capitalise names")


def test_pick_two_versions_runs_in_history_and_compare_their_prompts_and_outputs(
    context, expect, launcher, greeter
):
    provider = simulated("E2E compare simulator", latency_ms=5)
    old = run_to_the_end(launching.launch_run(card=greeter, provider=provider, user=launcher))
    new_version(greeter, launcher)
    new = run_to_the_end(launching.launch_run(card=greeter, provider=provider, user=launcher))
    assert (old.status, new.status) == ("failed", "succeeded")
    assert (old.version.number, new.version.number) == (1, 2)

    page = context.new_page()
    log_in(page, expect)
    page.goto(f"/history/?card={greeter.pk}")
    button = page.locator("#compare-selected")
    expect(button).to_be_disabled()
    page.check(f"#history input[name=runs][value='{new.pk}']")
    expect(page.locator("#compare-hint")).to_have_text("1 run ticked: tick one more.")
    page.check(f"#history input[name=runs][value='{old.pk}']")
    expect(button).to_be_enabled()
    screenshot(page, "compare-history-pick")

    button.click()
    page.wait_for_url(re.compile(rf"/compare/\?runs={old.pk},{new.pk}$"))
    prompt_diff = page.locator("#prompt-diff")
    expect(prompt_diff).to_contain_text("Greeter v1 → Greeter v2")
    expect(prompt_diff.locator("[data-role=system-prompt-diff] ins")).to_have_text(" and kind")
    expect(prompt_diff.locator("[data-role=template-diff] ins")).to_have_text("|title")
    rows = page.locator("#compare-table tbody tr")
    expect(rows).to_have_count(2)
    ada = rows.nth(0)
    expect(ada.locator("td.case")).to_contain_text("ada lovelace")
    changed = ada.locator("td.cell").nth(1).locator("[data-role=output]")
    expect(changed.locator("del")).to_have_text("ada lovelace")
    expect(changed.locator("ins")).to_have_text("Ada Lovelace")
    expect(ada.locator("td.cell").nth(0).locator("li.fail")).to_contain_text("contains")
    expect(ada.locator("td.cell").nth(1).locator("li.pass.changed")).to_contain_text("contains")
    expect(ada.locator("[data-role=latency-delta]")).to_have_count(1)
    expect(rows.nth(1).locator("td.cell ins, td.cell del")).to_have_count(0)
    screenshot(page, "compare-diff")

    page.click("#toggle-diff")
    page.wait_for_url(re.compile(r"diff=1"))
    expect(page.locator("#toggle-diff")).to_have_text("Show all cases")
    expect(rows).to_have_count(1)  # Grace Hopper's answer is the same in both
    expect(rows.first.locator("td.case")).to_contain_text("ada lovelace")
    expect(rows.first.locator(".tag.difference")).to_have_text(["verdict", "output", "assertions"])
    screenshot(page, "compare-differences-only")

    page.click("#prompt-diff h2 a >> text=Greeter v2")
    page.wait_for_url(re.compile(rf"/cards/{greeter.pk}/versions/2/$"))
    expect(page.locator("h1")).to_contain_text("Greeter v2")
    expect(page.locator("#version-meta")).to_contain_text("Capitalise names")
    expect(page.locator("#system-prompt-diff ins")).to_have_text(" and kind")
    expect(page.locator("#template-diff ins")).to_have_text("|title")
    expect(page.locator("#version-runs tr[data-run-id]")).to_have_count(1)
    screenshot(page, "version-diff")
    page.click("#previous-version")
    expect(page.locator("h1")).to_contain_text("Greeter v1")
    expect(page.locator("#restore-version")).to_have_count(0)  # alice may not change cards

    launcher.user_permissions.add(Permission.objects.get(codename="change_promptcard"))
    page.reload()
    page.click("#restore-version button")
    page.wait_for_url(re.compile(rf"/cards/{greeter.pk}/versions/3/$"))
    expect(page.locator(".flash")).to_have_text("Restored v1 as v3.")
    expect(page.locator("#change-note")).to_have_text("Restored v1")
    expect(page.locator("#template-diff del")).to_have_text("|title")
    greeter.refresh_from_db()
    assert greeter.template == "Hello {{ name }}!" and greeter.versions.count() == 3


def test_a_column_follows_its_run_live_and_the_table_fills_in_when_it_ends(
    context, expect, launcher, greeter
):
    provider = simulated("E2E live compare simulator", latency_ms=50)
    old = run_to_the_end(launching.launch_run(card=greeter, provider=provider, user=launcher))
    new_version(greeter, launcher)
    # Launched and admitted (no worker takes its cases yet): the page opens on a running run.
    live = launching.launch_run(card=greeter, provider=provider, user=launcher)
    page = context.new_page()
    log_in(page, expect)
    page.goto(f"/compare/?runs={old.pk},{live.pk}")
    header = page.locator(f"th.run-column[data-run-id='{live.pk}']")
    expect(header.locator("[data-role=status]")).to_have_text("running")
    page.evaluate("window.__notReloaded = true")

    thread = run_elsewhere(live)
    expect(header.locator("[data-role=status]")).to_have_text("succeeded")
    expect(header.locator("[data-role=counts]")).to_have_text("2/2 passed")
    cell = page.locator("#compare-table tbody tr").first.locator("td.cell").nth(1)
    expect(cell.locator("[data-role=output] ins")).to_have_text("Ada Lovelace")
    assert page.evaluate("window.__notReloaded") is True
    thread.join(timeout=60)
    screenshot(page, "compare-live")
