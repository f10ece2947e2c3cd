"""The page served at `/`, driven in a real browser: Debian's Chromium through Playwright, against a
`streamvlm serve` subprocess with the tiny checkpoint (the `serve` fixture).

Chromium comes from Debian (`apt-get install chromium`), never from `playwright install`. Where Playwright or
Chromium is missing these tests are skipped, unless STREAMVLM_REQUIRE_BROWSER=1, where they fail.
Screenshots go to the test's tmp_path, and also to STREAMVLM_SCREENSHOT_DIR when that is set.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Playwright waits, in milliseconds. Generous: the server loads the model on a 2-core CPU, and the first
# frame of a 1 fps stream arrives with the next status tick.
STARTUP_MS = 30_000
ANSWER_MS = 60_000
QUESTION = "What is happening in the video?"


def _missing(what: str) -> None:
    message = f"{what}; the browser tests need Playwright for Python and Debian's chromium package"
    if os.environ.get("STREAMVLM_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not importable (pip install playwright==1.65.2)")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page at 1280x800 (its own sessionStorage); uncaught script errors fail the test."""
    from playwright.sync_api import expect

    expect.set_options(timeout=STARTUP_MS)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    script_errors: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    yield page
    context.close()
    assert script_errors == [], f"the page threw: {script_errors}"


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path))
    keep = os.environ.get("STREAMVLM_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    return path


def _stream_ids(server) -> set[str]:
    """The streams open on the server (shared by the session's tests, so maybe others' too)."""
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    response = httpx.get(f"{server.url}/v1/streams", headers=headers, timeout=10)
    response.raise_for_status()
    return {stream["id"] for stream in response.json()["data"]}


def _attached(page, before: set[str], server) -> str:
    """The id of the stream the page started and attached to: new on the server, marked in the list."""
    from playwright.sync_api import expect

    expect(page.locator("#connection")).to_have_attribute("data-state", "open")
    (stream_id,) = _stream_ids(server) - before
    expect(page.locator(f'#streams li[data-id="{stream_id}"]')).to_have_class(re.compile(r"\battached\b"))
    return stream_id


def test_start_watch_ask_stop(serve, page, tmp_path):
    from playwright.sync_api import expect

    server = serve()
    page.goto(server.url + "/")
    expect(page.locator("#key-box")).to_be_hidden()  # no key asked for where the server needs none

    # Choosing from the list fills the source field.
    page.wait_for_selector('#source-list option[value="sample"]', state="attached")
    page.select_option("#source-list", "sample")
    assert page.input_value("#source") == "sample"
    assert page.input_value("#fps") == "1"
    before = _stream_ids(server)
    page.click("#start")
    stream_id = _attached(page, before, server)
    expect(page.locator("#error")).to_be_hidden()

    # A preview frame and the ingest count arrive with the status ticks.
    expect(page.locator("#preview")).to_be_visible()
    assert page.get_attribute("#preview", "src").startswith("data:image/jpeg;base64,")
    expect(page.locator("#preview-time")).to_have_text(re.compile(r"^t=\d\d:\d\d$"))
    page.wait_for_function("() => Number(document.querySelector('#stats dd[data-key=\"ingested\"]')"
                           "?.dataset.value) > 0", timeout=STARTUP_MS)

    # Ask with Enter; the answer streams in and is marked done.
    page.fill("#question", QUESTION)
    page.press("#question", "Enter")
    answer = page.locator("#answers .answer")
    expect(answer).to_have_count(1)
    expect(answer).to_have_class(re.compile(r"\bdone\b"), timeout=ANSWER_MS)
    expect(answer.locator(".answer-question")).to_have_text(QUESTION)
    meta = answer.locator(".answer-meta")
    expect(meta).to_contain_text(re.compile(r"at t=\d\d:\d\d \(\d+ frames?\)"))
    expect(meta).to_contain_text("first token")
    assert answer.get_attribute("data-stop-reason")
    assert answer.get_attribute("data-id") == "q1"
    shot = _screenshot(page, tmp_path, "page-answered.png")
    assert shot.stat().st_size > 0

    # Stop removes the stream on the server and detaches the page.
    page.click("#stop")
    expect(page.locator("#connection")).to_have_attribute("data-state", "idle")
    expect(page.locator(f'#streams li[data-id="{stream_id}"]')).to_have_count(0)
    expect(page.locator("#error")).to_be_hidden()
    assert stream_id not in _stream_ids(server)


def test_api_key(serve, page, tmp_path):
    from playwright.sync_api import expect

    server = serve(api_key="sk-page-test-0123456789")
    page.goto(server.url + "/")

    # Without a key the first API calls get 401: the key field shows, with the error, and takes the focus.
    expect(page.locator("#error")).to_contain_text("401")
    expect(page.locator("#key-box")).to_be_visible()
    expect(page.locator("#api-key")).to_be_focused()
    before = _stream_ids(server)
    page.fill("#source", "sample")
    page.click("#start")
    expect(page.locator("#error")).to_contain_text(re.compile(r"Starting the stream failed: HTTP 401"))
    expect(page.locator("#connection")).to_have_attribute("data-state", "idle")
    assert _stream_ids(server) == before

    # With the key (Enter commits it) the sources load, and a stream starts and its socket opens, the key
    # going as a subprotocol.
    page.fill("#api-key", server.api_key)
    page.press("#api-key", "Enter")
    expect(page.locator("#error")).to_be_hidden()
    page.wait_for_selector('#source-list option[value="sample"]', state="attached")
    assert page.evaluate("sessionStorage.getItem('streamvlm.apiKey')") == server.api_key
    page.click("#start")
    stream_id = _attached(page, before, server)
    expect(page.locator("#preview")).to_be_visible()
    _screenshot(page, tmp_path, "page-with-key.png")

    page.click("#stop")
    expect(page.locator("#connection")).to_have_attribute("data-state", "idle")
    assert stream_id not in _stream_ids(server)
