"""The chat UI in a real headless Chromium (Debian's ``chromium`` driven by Playwright).

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``playwright`` package;
``playwright install`` is not needed. Skips with the reason when either is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


CHROMIUM = os.environ.get("STEER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing (pip install playwright)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def watch_console(page) -> list[str]:
    """Collect console errors and uncaught page errors as they happen."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console: {m.text} @ {m.location.get('url')}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    return errors


def test_chat_in_chromium(browser, ui_server, tmp_path):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = watch_console(page)
    # Not "networkidle": a Gradio page keeps its queue connection open, so it never goes idle.
    page.goto(f"{ui_server.url}/ui/", wait_until="domcontentloaded")
    page.wait_for_selector("#steer-status:has-text('APM loaded')", timeout=60_000)

    # The sliders come from the server's schema: its description as info text, its range.
    humor = page.locator("input[aria-label='number input for humor']")
    assert humor.get_attribute("max") == "4"
    assert page.locator("#steer-chatbot").count() == 1
    assert page.get_by_text("How funny the reply is.").is_visible()
    # Attributes beyond the first three wait, folded, in "More attributes".
    assert page.locator("input[aria-label='number input for verbosity']").count() == 0
    page.get_by_text("More attributes").click()
    verbosity = page.locator("input[aria-label='number input for verbosity']")
    verbosity.wait_for(timeout=10_000)
    assert verbosity.get_attribute("max") == "6" and verbosity.input_value() == "2"

    humor.fill("4")
    humor.press("Enter")
    page.fill("#steer-message textarea", "Good evening! Do you have a room for the night?")
    page.click("#steer-send")

    # The steering note is added once the streamed reply is complete.
    note = page.locator("#steer-chatbot").get_by_text("applied: helpfulness 3, humor 4, creativity 2")
    note.wait_for(timeout=60_000)
    bot_text = page.locator("#steer-chatbot [data-testid='bot']").first.inner_text()
    assert len(bot_text.strip()) > 10, bot_text
    chat_text = page.locator("#steer-chatbot").inner_text()
    assert "measured: helpfulness" in chat_text and "quality 4" in chat_text and "verbosity 2" in chat_text
    assert "Good evening!" in chat_text
    page.screenshot(path=str(tmp_path / "ui-desktop.png"))

    # Phone width: the columns stack and the page still works.
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)
    assert page.locator("#steer-send").is_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390 + 1, f"the page scrolls sideways at phone width ({width}px)"
    page.screenshot(path=str(tmp_path / "ui-phone.png"), full_page=True)

    page.set_viewport_size({"width": 1280, "height": 900})

    # Clear empties the conversation.
    page.click("#steer-clear")
    page.locator("#steer-chatbot [data-testid='bot']").first.wait_for(state="detached", timeout=10_000)
    assert "Good evening!" not in page.locator("#steer-chatbot").inner_text()

    # The compare tab answers one message at two settings side by side.
    page.get_by_role("tab", name="Compare").click()
    b_humor = page.locator("#b-slot-1 input[type='number']")
    b_humor.fill("0")
    b_humor.press("Enter")
    page.fill("#steer-compare-message textarea", "What is on the stew pot tonight?")
    page.click("#steer-compare")
    page.locator("#steer-compare-a").get_by_text("measured:").wait_for(timeout=60_000)
    page.locator("#steer-compare-b").get_by_text("measured:").wait_for(timeout=60_000)
    assert "humor 1," in page.locator("#steer-compare-a").inner_text()
    assert "humor 0," in page.locator("#steer-compare-b").inner_text()
    page.screenshot(path=str(tmp_path / "ui-compare.png"))

    assert errors == [], "\n".join(errors)
    page.close()
    shots = os.environ.get("STEER_UI_SCREENSHOTS")
    if shots:  # keep the pictures (docs/ui-screenshot.png is copied from here)
        Path(shots).mkdir(parents=True, exist_ok=True)
        for name in ("ui-desktop.png", "ui-compare.png", "ui-phone.png"):
            shutil.copy(tmp_path / name, Path(shots) / name)
