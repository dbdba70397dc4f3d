"""Headless Chromium for the web pages' tests: Debian's browser (./run.sh test installs it), driven by Playwright."""

import contextlib
import shutil

from playwright.sync_api import Browser, Page, sync_playwright

PHONE = {"width": 375, "height": 812}
DESKTOP = {"width": 1280, "height": 900}


@contextlib.contextmanager
def chromium():
    """A headless Chromium, closed afterwards."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "Chromium is installed by ./run.sh test (Debian package chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Browser, viewport: dict = DESKTOP) -> Page:
    """A page in a fresh context (its own cookies), failing on any script error or CSP refusal the page logs."""
    page = browser.new_context(viewport=viewport).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.script_errors = errors  # asserted empty by check_layout
    return page


def check_layout(page: Page, screenshot_path) -> None:
    """The page fits its viewport's width (no horizontal scroll), logged no error, and is saved as a screenshot."""
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{page.url} scrolls sideways by {overflow} px at {page.viewport_size['width']} px"
    assert page.script_errors == [], page.script_errors
    page.screenshot(path=str(screenshot_path), full_page=True)
