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


def control_page(browser: Any, srv: Running) -> Any:
    """The page with the control cookie, once its event stream has delivered a result."""
    page = open_page(browser, f"{srv.url}/?token={TOKEN}")
    page.wait_for_function("() => Number(document.getElementById('results').dataset.seq) > 0")
    return page


def test_results_card_counts_only_the_results_the_model_can_give(browser: Any, srv: Running) -> None:
    page = control_page(browser, srv)
    try:
        assert page.inner_text("#result-kind") == "· top 5"
        with srv.client(TOKEN) as client:
            assert client.patch("/api/config", json={"top_k": 10}).status_code == 200
            # The fake model names 5 classes: "top 10" would promise 5 rows that cannot come.
            page.wait_for_function("() => document.getElementById('top_k').value === '10'")
            srv.wait_frames(2)
            page.wait_for_function("() => document.getElementById('result-kind').textContent !== ''")
            page.wait_for_timeout(300)
            assert page.inner_text("#result-kind") == "· top 5"
            assert client.patch("/api/config", json={"top_k": 3}).status_code == 200
            page.wait_for_function(
                "() => document.getElementById('result-kind').textContent === '· top 3'")
    finally:
        page.close()


def test_page_follows_changes_made_by_another_client(browser: Any, srv: Running) -> None:
    page = control_page(browser, srv)
    try:
        with srv.client(TOKEN) as client:
            changes = {"threshold": 0.3, "top_k": 3, "overlay": False, "display_res": "480p",
                       "model": "catdog", "source": "synthetic:320x240@30"}
            assert client.patch("/api/config", json=changes).status_code == 200
            # Pushed, not polled: every control follows without a reload.
            page.wait_for_function("() => document.getElementById('source').value === "
                                   "'synthetic:320x240@30'")
            assert page.input_value("#threshold") == "0.3"
            assert page.input_value("#threshold-range") == "0.3"
            assert page.input_value("#top_k") == "3"
            assert page.input_value("#display_res") == "480p"
            assert page.input_value("#model") == "catdog"
            assert not page.is_checked("#overlay")

            # A refused value: the error shows and the box holds the live value again.
            page.fill("#top_k", "0")
            page.press("#top_k", "Enter")
            error = page.wait_for_selector("#control-error:not([hidden])")
            assert "top_k" in error.inner_text()
            page.wait_for_function("() => document.getElementById('top_k').value === '3'")
            assert client.get("/api/config").json()["top_k"] == 3

            # A value applied from the page is no draft: the box follows later changes even
            # while it keeps the focus.
            page.fill("#threshold", "0.35")
            page.press("#threshold", "Enter")
            page.wait_for_function("() => document.getElementById('control-ok').textContent"
                                   ".includes('threshold')")
            assert client.patch("/api/config", json={"threshold": 0.45}).status_code == 200
            page.wait_for_function("() => document.getElementById('threshold').value === '0.45'")
            assert page.evaluate("() => document.activeElement.id") == "threshold"

            # What someone is typing is not overwritten by a change pushed meanwhile...
            page.fill("#source", "rtsp://half-typed")
            assert client.patch("/api/config", json={"threshold": 0.4,
                                                     "source": "synthetic:640x360@30"}).status_code == 200
            page.wait_for_function("() => document.getElementById('threshold').value === '0.4'")
            assert page.input_value("#source") == "rtsp://half-typed"
            # ...and once they leave the field without applying it, it shows the live value.
            page.click("h1")
            page.wait_for_function("() => document.getElementById('source').value === "
                                   "'synthetic:640x360@30'")
    finally:
        page.close()


def test_page_shows_an_unreachable_server_and_reconnects_by_itself(browser: Any, srv: Running) -> None:
    from app.server import ServerThread, create_server

    page = control_page(browser, srv)
    restarted = None
    try:
        page.wait_for_function("() => document.getElementById('stream').naturalWidth > 0")
        page.wait_for_function("() => document.getElementById('state').textContent === 'running'")
        page.wait_for_function("() => document.getElementById('fps').textContent !== '–'")
        srv.thread.stop()
        page.wait_for_function(
            "() => document.getElementById('state').textContent.includes('unreachable')")
        assert "reconnecting" in page.inner_text("#state")
        assert page.inner_text("#fps") == "–"
        assert page.inner_text("#infer-ms") == "–"
        assert page.get_attribute(".stream-wrap", "data-stale") == "true"
        assert page.locator("button[data-action=pause]").is_disabled()
        seq = results_seq(page)
        page.screenshot(path="/tmp/page-unreachable.png")

        # The same server back on the same port: the page picks it up without a reload.
        restarted = ServerThread(create_server(srv.service))
        restarted.start()
        assert restarted.url == srv.url
        page.wait_for_function("() => document.getElementById('state').textContent === 'running'")
        page.wait_for_function(f"() => Number(document.getElementById('results').dataset.seq) > {seq}")
        page.wait_for_function("() => !document.querySelector('.stream-wrap').dataset.stale")
        assert page.locator("button[data-action=pause]").is_enabled()
        with srv.client() as client:
            for _ in range(200):  # the <img> is a viewer of the new server again
                if any(v["kind"] == "mjpeg" for v in client.get("/api/stats").json()["viewers"]):
                    break
                page.wait_for_timeout(100)
            else:
                raise AssertionError("the stream did not reconnect")
    finally:
        page.close()
        if restarted is not None:
            restarted.stop()


def buttons_enabled(page: Any) -> list[str]:
    return page.eval_on_selector_all(
        "button[data-action]", "bs => bs.filter(b => !b.disabled).map(b => b.dataset.action)")


def test_pipeline_buttons_follow_the_state_and_a_refused_action_shows_as_an_error(
    browser: Any, srv: Running
) -> None:
    page = control_page(browser, srv)
    try:
        page.wait_for_function("() => document.querySelector('button[data-action=start]').disabled")
        assert buttons_enabled(page) == ["pause", "stop"]
        pause = page.get_attribute("button[data-action=pause]", "title") or ""
        stop = page.get_attribute("button[data-action=stop]", "title") or ""
        assert "camera" in pause and "model" in pause
        assert "camera" in stop and "model" in stop
        page.click("button[data-action=pause]")
        page.wait_for_function("() => document.getElementById('state').textContent === 'paused'")
        page.wait_for_function("() => !document.querySelector('button[data-action=resume]').disabled")
        assert buttons_enabled(page) == ["resume", "stop"]
        with srv.client(TOKEN) as client:
            # Stopped by someone else: the page follows.
            assert client.post("/api/pipeline/stop").status_code == 200
            page.wait_for_function("() => document.getElementById('state').textContent === 'stopped'")
            page.wait_for_function("() => !document.querySelector('button[data-action=start]').disabled")
            assert buttons_enabled(page) == ["start"]
            # A click that raced a change elsewhere: the server's 409 shows as an error.
            page.eval_on_selector("button[data-action=pause]", "b => { b.disabled = false; }")
            page.click("button[data-action=pause]")
            error = page.wait_for_selector("#control-error:not([hidden])")
            assert "cannot pause" in error.inner_text()
            assert page.is_hidden("#control-ok")
            assert client.get("/results").json()["state"] == "stopped"
            page.wait_for_function("() => document.querySelector('button[data-action=pause]').disabled")
    finally:
        page.close()


def test_iot_panel_collapses_repeats_and_rounds_probabilities(browser: Any) -> None:
    from inference.outputs.iot import IotOutput, NullPublisher
    from inference.service import Service
    from tests.test_server import fake_model_factory, serve_runtime, server_settings

    settings = server_settings()
    service = Service(settings, model_factory=fake_model_factory)
    iot = IotOutput(settings, service.hub, NullPublisher(), thing="x")
    service.add_output(iot)
    with serve_runtime(service) as srv:
        page = control_page(browser, srv)
        try:
            page.wait_for_function("() => [...document.querySelectorAll('#iot .count')]"
                                   ".some(c => Number(c.textContent.replace('×', '')) >= 3)")
            rows = page.locator("#iot li")
            # The fake model's probabilities are float32: 0.2 is 0.20000000298023224 in the JSON.
            newest = rows.nth(0)
            text = newest.inner_text()
            assert "class0 50%" in text and "20%" in text, text
            assert "0.2000000" not in text
            assert "×" in newest.locator(".count").inner_text()
            raw = newest.locator(".raw").text_content() or ""
            assert "0.20000000298023224" in raw, "the raw message stays available"
            assert rows.count() <= 3, "identical messages are one row"
            # Newest first, with the time.
            times = page.eval_on_selector_all("#iot li", "ls => ls.map(l => Number(l.dataset.time))")
            assert times == sorted(times, reverse=True)
            assert newest.locator(".when").inner_text()
            newest.locator("summary").click()
            page.screenshot(path="/tmp/page-iot.png", full_page=True)
        finally:
            page.close()


def test_the_page_names_the_file_each_result_came_from(browser: Any, tmp_path: Any) -> None:
    import cv2
    import numpy as np

    for name, value in (("first.png", 40), ("second.png", 200)):
        cv2.imwrite(str(tmp_path / name), np.full((120, 160, 3), value, np.uint8))
    with running_server(source=str(tmp_path), slide_interval=0.5) as srv:
        srv.wait_frames(1)
        page = open_page(browser, srv.url + "/")
        try:
            seen = set()
            for _ in range(150):  # the slideshow moves on every 0.5 s: both names show in turn
                page.wait_for_timeout(100)
                # one read of both: the slideshow may move on between two
                text, title = page.eval_on_selector("#source-name", "e => [e.innerText, e.title]")
                if text:
                    seen.add(text)
                    assert title == str(tmp_path / text)
                if len(seen) == 2:
                    break
            assert seen == {"first.png", "second.png"}
        finally:
            page.close()
