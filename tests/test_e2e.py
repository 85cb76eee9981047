"""End to end in a real browser: Playwright drives Debian's chromium against the real ASGI
server (daphne), real Dramatiq worker processes, PostgreSQL and Redis. Screenshots of each
page go to the test output directory (test-output/screenshots/)."""

from __future__ import annotations

import csv
import re

import pytest

from testruns.engine import gate, launching, limits
from testruns.models import TestCase, TestRun
from tests.browser import XSS, launch_from_page, log_in, screenshot, simulated
from tests.conftest import OUTPUT_DIR, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]


def test_queue_positions_fall_live_progress_reaches_100_and_runs_can_be_cancelled(
    context, expect, launcher, make_card, worker_factory
):
    provider = simulated("E2E simulator", latency_ms=100)
    limits.ensure_semaphores(provider)
    limits.set_limit(gate.RUNS, 2)
    card = make_card(cases=4)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    log_in(page, expect)
    ids = [
        launch_from_page(page, card, provider, shot="launch" if i == 0 else None) for i in range(5)
    ]
    # No worker yet: runs 1 and 2 hold the two slots; 3, 4 and 5 wait in that order.
    assert list(TestRun.objects.order_by("pk").values_list("status", flat=True)) == [
        "running",
        "running",
        "queued",
        "queued",
        "queued",
    ]

    watcher = context.new_page()  # run 5's page stays open, never reloaded
    watcher.goto(f"/runs/{ids[4]}/")
    position = watcher.locator("#run-position")
    expect(position).to_have_text("You are #3 in the queue")
    expect(watcher.locator("#run-waited")).to_contain_text("Waiting for")
    watcher.evaluate("window.__notReloaded = true")
    screenshot(watcher, "run-waiting")
    second = context.new_page()  # run 2's page, to watch its bar fill
    second.goto(f"/runs/{ids[1]}/")
    expect(second.locator("#run-status")).to_have_text("running")

    dashboard = context.new_page()
    dashboard.goto("/")
    expect(dashboard.locator("#live")).to_have_text("live")
    expect(dashboard.locator("#waiting tr[data-run-id]")).to_have_count(3)

    # Cancel a waiting run from its page: run 5 moves up live.
    page.goto(f"/runs/{ids[3]}/")
    expect(page.locator("#run-position")).to_have_text("You are #2 in the queue")
    page.click("#run-cancel button")
    expect(page.locator("#run-status")).to_have_text("cancelled")
    expect(position).to_have_text("You are #2 in the queue")
    expect(dashboard.locator("#waiting tr[data-run-id]")).to_have_count(2)

    # Cancel a running run: its slot goes to run 3, and run 5 is next.
    page.goto(f"/runs/{ids[0]}/")
    expect(page.locator("#run-status")).to_have_text("running")
    page.click("#run-cancel button")
    expect(page.locator("#run-status")).to_have_text("cancelled")
    expect(position).to_have_text("You are #1 in the queue")
    expect(dashboard.locator("#waiting tr[data-run-id]")).to_have_count(1)
    expect(dashboard.locator(f"#waiting tr[data-run-id='{ids[4]}']")).to_contain_text("#1")
    expect(dashboard.locator('#slots li[data-slot="runs"] .count')).to_have_text("2 / 2")
    expect(dashboard.locator(f"#running tr[data-run-id='{ids[2]}']")).to_be_visible()
    expect(dashboard.locator(f"#running tr[data-run-id='{ids[0]}']")).to_have_count(0)
    expect(dashboard.locator("#running tr[data-run-id]")).to_have_count(2)
    screenshot(dashboard, "dashboard")

    # Workers run 2 and 3; run 5 gets a slot and runs to the end, all seen live.
    worker_factory(processes=1, threads=4)
    for run_page in (watcher, second):
        expect(run_page.locator("#run-status")).to_have_text("succeeded", timeout=90_000)
        expect(run_page.locator(".progress")).to_have_attribute("aria-valuenow", "100")
        expect(run_page.locator(".progress .bar")).to_have_attribute("style", "width: 100%;")
        expect(run_page.locator("#run-counts")).to_contain_text("4/4 cases done · 4 passed")
        expect(run_page.locator("#run-results tr")).to_have_count(4)
    expect(watcher.locator("#run-queue")).to_be_hidden()
    assert watcher.evaluate("window.__notReloaded") is True
    screenshot(watcher, "run-finished")
    expect(dashboard.locator(f"#recent tr[data-run-id='{ids[4]}']")).to_contain_text("succeeded")
    expect(dashboard.locator("#waiting tr[data-run-id]")).to_have_count(0)
    assert dict(TestRun.objects.values_list("pk", "status")) == {
        ids[0]: "cancelled",
        ids[1]: "succeeded",
        ids[2]: "succeeded",
        ids[3]: "cancelled",
        ids[4]: "succeeded",
    }


def test_page_catches_up_after_its_websocket_drops_mid_run_with_nothing_lost_or_doubled(
    context, expect, launcher, make_card, worker_factory
):
    provider = simulated("E2E steady simulator", latency_ms=100)
    provider_slots = gate.provider_semaphore(provider.pk)
    card = make_card(cases=30)
    run = launching.launch_run(card=card, provider=provider, user=launcher, max_concurrent_tests=1)
    page = context.new_page()
    sockets, blocked = [], {"on": False}

    def route(ws):
        if blocked["on"]:  # the network is down: the page's reconnects fail
            ws.close(code=4000, reason="network down")
            return
        ws.connect_to_server()
        sockets.append(ws)

    page.route_web_socket(re.compile(r"/ws/runs/"), route)
    log_in(page, expect)
    page.goto(f"/runs/{run.pk}/")
    expect(page.locator("#run-live")).to_have_text("live")
    worker_factory(processes=1, threads=2)

    # Let a few cases through, then hold the run mid-way (a provider limit of 0 admits
    # nothing more) and check the page saw every one of them live.
    wait_for(lambda: TestRun.objects.get(pk=run.pk).done_count >= 3, what="three cases")
    limits.set_limit(provider_slots, 0)
    wait_for(lambda: not run.results.filter(status="running").exists(), what="a pause")
    done_at_drop = TestRun.objects.get(pk=run.pk).done_count
    assert 3 <= done_at_drop < 30
    expect(page.locator("#run-results tr")).to_have_count(done_at_drop)

    # Drop the connection; while it is down, neither reconnects nor polls get through, and
    # the run goes on to the end.
    page.route("**/status.json", lambda request: request.abort())
    blocked["on"] = True
    sockets[-1].close(code=4000, reason="dropped by the test")
    expect(page.locator("#run-live")).to_have_text("reconnecting…")
    limits.set_limit(provider_slots, 4)
    wait_for(
        lambda: TestRun.objects.get(pk=run.pk).status == "succeeded",
        timeout=60,
        what="the run to finish while the page is cut off",
    )
    assert page.locator("#run-results tr").count() == done_at_drop  # it heard nothing

    blocked["on"] = False
    page.unroute("**/status.json")
    expect(page.locator("#run-status")).to_have_text("succeeded")
    expect(page.locator("#run-results tr")).to_have_count(30)
    positions = page.locator("#run-results tr td:first-child").all_text_contents()
    assert positions == [str(n) for n in range(1, 31)]  # each once, in order
    ids = page.locator("#run-results tr").evaluate_all(
        "rows => rows.map(row => row.dataset.resultId)"
    )
    assert len(set(ids)) == 30
    expect(page.locator("#run-counts")).to_contain_text("30/30 cases done · 30 passed")
    screenshot(page, "run-after-reconnect")


def test_output_is_escaped_in_the_browser_and_the_report_downloads_as_csv(
    context, expect, launcher, make_card, worker_factory
):
    provider = simulated("E2E fast simulator", latency_ms=20)
    card = make_card("xss", cases=2)
    TestCase.objects.filter(card=card, name="case 0").update(variables={"name": XSS})
    worker_factory(processes=1, threads=2)
    page = context.new_page()
    log_in(page, expect)
    run_id = launch_from_page(page, card, provider)
    expect(page.locator("#run-status")).to_have_text("failed")  # case 0 lacks "N0"
    rows = page.locator("#run-results tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("[simulated] Say hello to " + XSS)
    assert page.locator("#run-results script, #run-results img").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"
    screenshot(page, "run-escaped-output")

    page.click("#run-report")
    expect(page.locator("h1")).to_contain_text(f"Report: run #{run_id}")
    expect(page.locator("#cases")).to_contain_text(XSS)
    assert page.locator("#cases script, #cases img").count() == 0
    expect(page.locator("#stat-pass-rate")).to_have_text("50 %")
    screenshot(page, "report")
    with page.expect_download() as download:
        page.click("#export-csv")
    path = OUTPUT_DIR / f"run-{run_id}.csv"
    download.value.save_as(path)
    with path.open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["case"] for row in table] == ["case 0", "case 1"]
    assert table[0]["status"] == "failed" and XSS in table[0]["output"]

    page.goto(f"/compare/?runs={run_id}")
    expect(page.locator("#compare-table")).to_contain_text(XSS)
    screenshot(page, "compare")
    page.goto(f"/history/?card={card.pk}")
    expect(page.locator("figure.chart svg circle.rate")).to_have_count(1)
    screenshot(page, "history")
    assert page.evaluate("typeof window.__xss") == "undefined"


def test_a_ten_thousand_case_run_keeps_the_page_small_and_pages_the_rest(
    context, expect, launcher, make_card
):
    provider = simulated("E2E big simulator", latency_ms=1)
    card = make_card("big", cases=0)
    TestCase.objects.bulk_create(
        TestCase(card=card, name=f"case {i}", variables={"name": f"N{i}"}, order=i)
        for i in range(10_000)
    )
    run = launching.launch_run(card=card, provider=provider, user=launcher)
    run.results.update(status="passed", output="fine", latency_ms=5)
    TestRun.objects.filter(pk=run.pk).update(done_count=10_000, passed_count=10_000)
    page = context.new_page()
    log_in(page, expect)
    page.goto(f"/runs/{run.pk}/")
    expect(page.locator("#run-counts")).to_contain_text("10000/10000 cases done")
    rows = page.locator("#run-results tr")
    expect(rows).to_have_count(100)  # the latest 100 by position; the DOM stays small
    expect(rows.first.locator("td").first).to_have_text("9901")
    expect(page.locator("#run-window")).to_have_text(
        "Showing the latest 100 of 10000 finished cases."
    )
    page.click("#run-pager [data-page=first]")
    expect(page.locator("#run-page-label")).to_have_text("page 1 of 200")
    expect(rows).to_have_count(50)
    expect(rows.first.locator("td").first).to_have_text("1")
    page.click("#run-pager [data-page=next]")
    expect(page.locator("#run-page-label")).to_have_text("page 2 of 200")
    expect(rows.first.locator("td").first).to_have_text("51")
    screenshot(page, "run-10000-cases-paged")
    page.click("#run-pager [data-page=live]")
    expect(rows).to_have_count(100)
    expect(rows.first.locator("td").first).to_have_text("9901")


def test_without_a_websocket_the_run_page_polls_and_still_follows_the_run(
    context, expect, launcher, make_card, worker_factory
):
    provider = simulated("E2E polled simulator", latency_ms=20)
    run = launching.launch_run(card=make_card(cases=5), provider=provider, user=launcher)
    page = context.new_page()
    # Every WebSocket is refused, as behind a proxy that does not pass them through.
    page.route_web_socket(re.compile(r"/ws/"), lambda ws: ws.close(code=4000, reason="no"))
    log_in(page, expect)
    page.goto(f"/runs/{run.pk}/")
    expect(page.locator("#run-live")).to_have_text("reconnecting…")
    worker_factory(processes=1, threads=2)
    expect(page.locator("#run-status")).to_have_text("succeeded")
    expect(page.locator("#run-results tr")).to_have_count(5)
    expect(page.locator("#run-counts")).to_contain_text("5/5 cases done · 5 passed")
    expect(page.locator("#run-report")).to_be_visible()
