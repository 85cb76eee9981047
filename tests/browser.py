"""Browser test plumbing, a pytest plugin (tests/conftest.py loads it): Playwright drives
Debian's chromium, headless, against the real ASGI server. Fixtures `browser` (one per
module), `context` (a page context logged out, on the test's daphne) and `expect`; helpers
to log in, launch from the page, take screenshots (test-output/screenshots/)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from testruns.models import Provider
from tests.conftest import OUTPUT_DIR

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = OUTPUT_DIR / "screenshots"
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
PASSWORD = "alice-password-1"  # the launcher fixture's


def browser_unavailable(reason: str):
    """Fail in CI and wherever apt-get could have installed the browser (`make test` does);
    skip only on a developer machine without apt."""
    in_ci = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
    if in_ci or shutil.which("apt-get"):
        pytest.fail(f"{reason}: browser tests cannot run (make test installs chromium).")
    pytest.skip(f"{reason}, and no apt-get to install it")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        browser_unavailable(f"{CHROMIUM} is missing")
    try:
        # Imported here: without playwright (a developer machine), only the browser tests
        # fail or skip, with a message, instead of the whole module failing to import.
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        browser_unavailable("playwright is not installed")
    expect.set_options(timeout=30_000)
    # Playwright's sync API keeps an event loop on this thread between its calls, which
    # Django takes for async code; the test itself is plain synchronous code.
    with pytest.MonkeyPatch.context() as patch, sync_playwright() as playwright:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def context(browser, asgi_server):
    context = browser.new_context(
        base_url=f"http://{asgi_server}",
        accept_downloads=True,
        viewport={"width": 1280, "height": 900},
    )
    context.set_default_timeout(30_000)
    yield context
    context.close()


@pytest.fixture
def expect():
    # Imported here for the same reason as in browser().
    from playwright.sync_api import expect

    return expect


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def log_in(page, expect, username: str = "alice", password: str = PASSWORD) -> None:
    page.goto("/login/")
    screenshot(page, "login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Dashboard")


def launch_from_page(page, card, provider, *, shot: str | None = None) -> int:
    page.goto(f"/launch/?card={card.pk}")
    page.check(f"input[name=providers][value='{provider.pk}']")
    page.fill("input[name=max_concurrent_tests]", "1")
    if shot:
        screenshot(page, shot)
    page.click("#launch")
    page.wait_for_url(re.compile(r"/runs/\d+/$"))
    return int(re.search(r"/runs/(\d+)/$", page.url).group(1))


def simulated(name: str, latency_ms: int) -> Provider:
    return Provider.objects.create(
        name=name,
        kind=Provider.Kind.SIMULATOR,
        model="sim",
        max_concurrency=4,
        parameters={"latency_ms": latency_ms, "jitter_ms": 0, "error_rate": 0},
    )
