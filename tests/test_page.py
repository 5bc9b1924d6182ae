"""The control page in real headless Chromium: the stream shows, results update live, and the
page's controls change what /results returns (and show the server's 422s)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.test_server import TOKEN, Running, running_server

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def srv() -> Iterator[Running]:
    with running_server(source="synthetic:1280x720@30") as running:
        running.wait_frames(1)
        yield running


def open_page(browser: Any, url: str, width: int = 1280, height: int = 900) -> Any:
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    return page


def results_seq(page: Any) -> int:
    return int(page.eval_on_selector("#results", "el => Number(el.dataset.seq || 0)"))


def test_page_shows_the_stream_and_live_results_and_its_controls_work(
    browser: Any, srv: Running
) -> None:
    page = open_page(browser, f"{srv.url}/?token={TOKEN}")
    try:
        assert page.url == f"{srv.url}/", "the token is traded for a cookie and leaves the URL"
        page.wait_for_function("() => document.getElementById('stream').naturalWidth > 0")
        assert page.eval_on_selector("#stream", "img => img.naturalWidth") == 1280
        page.wait_for_function("() => Number(document.getElementById('results').dataset.seq) > 0")
        first = results_seq(page)
        page.wait_for_function(f"() => Number(document.getElementById('results').dataset.seq) > {first}")
        assert page.locator("#results li").count() == 5
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 1280, "overflows sideways"
        for control in ("#top_k", "button[data-action=pause]"):
            assert page.locator(control).is_enabled(), control

        with srv.client() as client:
            page.fill("#threshold", "0.3")
            page.press("#threshold", "Enter")  # 'change' fires
            page.wait_for_selector("#control-ok:not([hidden])")
            seq = srv.wait_frames(2)
            data = client.get("/results").json()
            assert data["seq"] >= seq and data["threshold"] == 0.3
            assert [r["name"] for r in data["results"]] == ["class0"]
            page.wait_for_function("() => document.querySelectorAll('#results li').length === 1")

            page.fill("#top_k", "0")
            page.press("#top_k", "Enter")
            error = page.wait_for_selector("#control-error:not([hidden])")
            # The server's 422 (FastAPI's, pydantic's words) shown with the field it names.
            assert "top_k" in error.inner_text()
            assert "greater than or equal to 1" in error.inner_text()
            assert page.get_attribute("#top_k", "aria-invalid") == "true"
            assert client.get("/api/config").json()["top_k"] == 5

            page.click("button[data-action=pause]")
            page.wait_for_function("() => document.getElementById('state').textContent === 'paused'")
            assert client.get("/results").json()["state"] == "paused"
            page.click("button[data-action=resume]")
            page.wait_for_function("() => document.getElementById('state').textContent === 'running'")
            assert client.get("/results").json()["state"] == "running"

        page.wait_for_timeout(500)  # let the bars settle for the picture
        page.screenshot(path="/tmp/page.png", full_page=True)
    finally:
        page.close()


def test_page_without_the_token_is_read_only_and_fits_a_phone(browser: Any, srv: Running) -> None:
    page = open_page(browser, f"{srv.url}/", width=390, height=844)
    try:
        page.wait_for_function("() => document.getElementById('stream').naturalWidth > 0")
        for control in ("#top_k", "button[data-action=pause]"):
            assert page.locator(control).is_disabled(), control
        assert "Read-only" in page.inner_text(".controls-card")
        page.wait_for_function("() => Number(document.getElementById('results').dataset.seq) > 0")
        # Nothing overflows sideways on a phone.
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
        page.screenshot(path="/tmp/page-phone.png", full_page=True)
    finally:
        page.close()
