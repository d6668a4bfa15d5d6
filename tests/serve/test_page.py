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
        pytest.skip("no Chromium: apt-get install chromium (scripts/setup_browser.sh)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        yield page
        browser.close()


def test_type_a_message_and_see_it_streamed(server, page, tmp_path):
    page.goto(server.url)
    page.click("summary")  # the settings
    page.fill("#key", API_KEY)
    page.fill("#temp", "0")  # greedy, so the answer is known
    page.wait_for_function("document.getElementById('info').textContent.includes('cache')")
    page.fill("#input", "What is the capital of France?")
    page.keyboard.press("Enter")
    reply = page.locator(".msg.assistant span").last
    page.wait_for_function("document.querySelectorAll('.msg.assistant span').length === 1 && "
                           "document.querySelector('.msg.assistant span').textContent.length > 0")
    partial = reply.text_content()  # the first pieces, while the rest is still coming
    page.wait_for_function("!document.getElementById('send').disabled", timeout=120_000)
    final = reply.text_content()
    assert "Paris" in final and final.startswith(partial)
    assert page.locator(".msg.user span").first.text_content() == "What is the capital of France?"
    assert "tokens seen" in page.locator("#info").text_content()  # the session's numbers, from the last chunk
    page.fill("#input", "And of Italy?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant span').length === 2 && "
                           "!document.getElementById('send').disabled", timeout=120_000)
    assert "Rome" in page.locator(".msg.assistant span").last.text_content()
    assert not page.locator(".msg.error").count()
    page.screenshot(path=str(tmp_path / "chat.png"))
