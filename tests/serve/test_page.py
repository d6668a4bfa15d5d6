"""The chat page at / in a real headless Chromium (Debian's package): type a message, see the
reply stream in, and the conversation continue in its session."""

from __future__ import annotations

import shutil

import pytest

from serving import API_KEY

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("no Chromium: apt-get install chromium (scripts/setup_services.sh)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        yield page
        browser.close()


def test_type_a_message_and_see_it_streamed(server, page, tmp_path):
    """Under the page's Content-Security-Policy, which forbids eval: the waits are Playwright's
    locator assertions (its own isolated script), not wait_for_function strings."""
    expect = pytest.importorskip("playwright.sync_api").expect
    page.goto(server.url)
    page.click("summary")  # the settings
    page.fill("#key", API_KEY)
    page.fill("#temp", "0")  # greedy, so the answer is known
    expect(page.locator("#info")).to_contain_text("cache", timeout=60_000)
    page.fill("#input", "What is the capital of France?")
    page.keyboard.press("Enter")
    reply = page.locator(".msg.assistant span").last
    expect(page.locator(".msg.assistant span")).to_have_count(1, timeout=60_000)
    expect(reply).not_to_be_empty(timeout=120_000)
    partial = reply.text_content()  # the first pieces, while the rest is still coming
    expect(page.locator("#send")).to_be_enabled(timeout=120_000)
    final = reply.text_content()
    assert "Paris" in final and final.startswith(partial)
    assert page.locator(".msg.user span").first.text_content() == "What is the capital of France?"
    assert "tokens seen" in page.locator("#info").text_content()  # the session's numbers, from the last chunk
    page.fill("#input", "And of Italy?")
    page.click("#send")
    expect(page.locator(".msg.assistant span")).to_have_count(2, timeout=120_000)
    expect(page.locator("#send")).to_be_enabled(timeout=120_000)
    assert "Rome" in page.locator(".msg.assistant span").last.text_content()
    assert not page.locator(".msg.error").count()
    page.screenshot(path=str(tmp_path / "chat.png"))
