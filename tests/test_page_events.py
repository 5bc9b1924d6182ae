"""The events panel in real headless Chromium, on a real uvicorn with a recording service: an
event shows as it starts (pushed over SSE, not polled), ends live, filters by label, plays its
H.264 clip in the browser's own <video>, and deletes with the token (a 409 while in progress shows
as an error). Plus the SSE stream's ``event`` notices at the API level, encoded once for all."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.outputs import build_outputs
from inference.service import Service
from inference.types import RawOutputs
from tests.conftest import wait_for
from tests.test_page import WAIT_MS, browser, open_page  # noqa: F401  (the browser fixture)
from tests.test_server import TOKEN, FakeModel, Running, serve_runtime, server_settings

QUIET = (0.1, 0.2, 0.15, 0.1, 0.05)  # no rule matches: class0 and class2 need 0.4
HIGH = 0.6


class Dial:
    """What the model says, set by the test while the loop runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._probs = list(QUIET)

    def set(self, **labels: float) -> None:
        probs = list(QUIET)
        for name, prob in labels.items():
            probs[int(name.replace("class", ""))] = prob
        with self._lock:
            self._probs = probs

    def probs(self) -> list[float]:
        with self._lock:
            return list(self._probs)


class DialModel(FakeModel):
    def __init__(self, dial: Dial, name: str) -> None:
        super().__init__(name)
        self.dial = dial

    def infer(self, inputs: Any) -> RawOutputs:
        return {"out": np.array(self.dial.probs(), np.float32)}


@pytest.fixture
def recording(tmp_path: Path) -> Iterator[tuple[Running, Dial]]:
    dial = Dial()
    settings = server_settings("synthetic:640x360@15", data_dir=str(tmp_path / "data"),
                               record=("class0:0.4", "class2:0.4"), record_debounce=1,
                               pre_roll=0.5, post_roll=0.5, record_cooldown=0.5, display_res="480p")
    service = Service(settings, model_factory=lambda s: DialModel(dial, s.model))
    service.outputs = build_outputs(settings, service.hub)
    service.prepare(strict=True)
    with serve_runtime(service) as running:
        running.wait_frames(1)
        yield running, dial




def row(event_id: int) -> str:
    return f"#events li[data-id='{event_id}']"


def shown_labels(page: Any) -> list[str]:
    return list(page.eval_on_selector_all("#events li", "ls => ls.map(l => l.dataset.label)"))


def test_events_panel_live_filter_play_and_delete(browser: Any, recording: Any) -> None:  # noqa: F811
    srv, dial = recording
    page = open_page(browser, f"{srv.url}/?token={TOKEN}")
    history_loads: list[str] = []
    page.on("request", lambda r: history_loads.append(r.url) if "/api/events?" in r.url else None)
    try:
        page.wait_for_selector(".events-card[data-recording=on]")
        assert "No events yet" in page.inner_text("#events-empty")
        assert "class0:0.4" in page.inner_text("#events-info")
        page.evaluate("() => { window.sameDocument = true; }")
        loads = len(history_loads)

        # An event starts: its row comes with the SSE notice, no reload, no new history request.
        dial.set(class0=HIGH)
        page.wait_for_selector("#events li[data-label=class0][data-in-progress=true]")
        first = int(page.get_attribute("#events li[data-label=class0]", "data-id") or 0)
        assert page.evaluate("() => window.sameDocument") is True
        assert len(history_loads) == loads, "pushed, not polled"
        assert page.is_hidden("#events-empty")
        live = page.locator(f"{row(first)} .dur")
        assert "in progress" in live.inner_text() and "live" in (live.get_attribute("class") or "")
        assert page.eval_on_selector(f"{row(first)} img.thumb",
                                     "img => img.complete && img.naturalWidth") > 0
        assert "60.0%" in page.inner_text(row(first))
        time.sleep(2.0)  # a clip of a few seconds: pre-roll, 2 s of class0, post-roll

        # It ends: the end notice gives the row its duration.
        dial.set()
        page.wait_for_selector(f"{row(first)}[data-in-progress=false]")
        duration = page.inner_text(f"{row(first)} .dur")
        assert "in progress" not in duration and duration.endswith(" s"), duration
        with srv.client() as client:
            event = client.get(f"/api/events/{first}").json()
        assert not event["in_progress"] and event["clip_url"] and event["clip_kind"] == "h264"

        # A second label: its row goes on top.
        dial.set(class2=HIGH)
        page.wait_for_selector("#events li[data-label=class2][data-in-progress=true]")
        second = int(page.get_attribute("#events li[data-label=class2]", "data-id") or 0)
        assert shown_labels(page) == ["class2", "class0"]
        assert len(history_loads) == loads

        # Filter by label, from the labels the history and the notices named.
        options = page.eval_on_selector_all("#events-label option", "os => os.map(o => o.value)")
        assert options == ["", "class0", "class2"]
        page.select_option("#events-label", "class0")
        page.wait_for_function("() => [...document.querySelectorAll('#events li')]"
                               ".map(l => l.dataset.label).join() === 'class0'")
        assert history_loads[-1].endswith("label=class0")
        page.select_option("#events-label", "class2")
        page.wait_for_function("() => [...document.querySelectorAll('#events li')]"
                               ".map(l => l.dataset.label).join() === 'class2'")
        page.select_option("#events-label", "")
        page.wait_for_function("() => document.querySelectorAll('#events li').length === 2")

        # The ended event's clip plays in the browser's own player.
        page.click(f"{row(first)} .open")
        page.wait_for_selector("#player:not([hidden])")
        assert page.get_attribute(row(first), "data-playing") == "true"
        page.wait_for_function("() => document.getElementById('event-video').readyState >= 2")
        start = page.evaluate("() => document.getElementById('event-video').currentTime")
        page.wait_for_function(
            f"() => document.getElementById('event-video').currentTime > {start} + 0.3")
        video = page.evaluate("() => { const v = document.getElementById('event-video');"
                              " return {duration: v.duration, width: v.videoWidth,"
                              " height: v.videoHeight, error: v.error && v.error.code}; }")
        assert video["error"] is None and video["width"] > 0 and video["height"] > 0, video
        assert video["duration"] >= 2.0, video
        assert page.is_hidden("#events-error")
        page.screenshot(path="/tmp/page-events.png", full_page=True)

        # Deleting the event in progress: the server's 409, shown as an error; the row stays.
        page.click(f"{row(second)} .delete")
        assert page.inner_text(f"{row(second)} .delete") == "Confirm"
        page.click(f"{row(second)} .delete")
        error = page.wait_for_selector("#events-error:not([hidden])")
        assert "still being recorded" in error.inner_text()
        assert page.locator(row(second)).count() == 1

        # Deleting the ended one (the one playing): it goes, and so does the player.
        page.click(f"{row(first)} .delete")
        page.click(f"{row(first)} .delete")
        page.wait_for_selector(row(first), state="detached")
        assert page.is_hidden("#player") and page.is_hidden("#events-error")
        with srv.client() as client:
            assert client.get(f"/api/events/{first}").status_code == 404
        assert shown_labels(page) == ["class2"]
        dial.set()
        page.wait_for_selector(f"{row(second)}[data-in-progress=false]")
    finally:
        page.close()


def test_events_panel_read_only_on_a_phone_with_the_history_loaded(browser: Any, recording: Any) -> None:  # noqa: F811
    srv, dial = recording
    dial.set(class0=HIGH)
    with srv.client() as client:
        wait_for(lambda: client.get("/api/events").json()["events"], what="an event")
    dial.set()
    page = open_page(browser, f"{srv.url}/", width=390, height=844)
    try:
        # The history loads with the page (the event may have ended by then, or end live).
        page.wait_for_selector("#events li[data-label=class0]")
        page.wait_for_selector("#events li[data-in-progress=false]")
        assert page.locator("#events .delete").count() == 0, "no Delete without the control cookie"
        page.click("#events li .open")
        page.wait_for_function("() => document.getElementById('event-video').readyState >= 2")
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390, "overflows sideways"
        box = page.locator("#event-video").bounding_box()
        assert box is not None and box["width"] <= 390
        page.screenshot(path="/tmp/page-events-phone.png", full_page=True)
    finally:
        page.close()


def test_events_panel_says_how_to_turn_recording_on(browser: Any, tmp_path: Path) -> None:  # noqa: F811
    from tests.test_server import running_server

    with running_server(data_dir=str(tmp_path / "empty")) as srv:
        page = open_page(browser, f"{srv.url}/?token={TOKEN}")
        try:
            page.wait_for_selector(".events-card[data-recording=off]")
            text = page.inner_text("#events-empty")
            assert "Recording is off" in text and "--record LABEL" in text, text
            assert page.inner_text("#events-info") == "· recording off"
            assert page.locator("#events li").count() == 0
        finally:
            page.close()


# -- the SSE notices at the API level -------------------------------------------------------------
class Subscriber(threading.Thread):
    """Reads /results/events and keeps the raw data of its ``event`` events."""

    def __init__(self, srv: Running) -> None:
        super().__init__(name="sse-subscriber", daemon=True)
        self.srv = srv
        self.following = threading.Event()
        self.done = threading.Event()
        self.notices: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.srv.client() as client, client.stream("GET", "/results/events") as response:
                assert response.status_code == 200
                kind = ""
                for line in response.iter_lines():
                    if self.done.is_set():
                        break
                    if line.startswith("event: "):
                        kind = line[len("event: "):]
                    elif line.startswith("data: "):
                        if kind == "state":
                            self.following.set()
                        elif kind == "event":
                            self.notices.append(line[len("data: "):])
                        kind = ""
        except BaseException as exc:  # shown by the test
            self.error = exc

    def types(self) -> list[str]:
        return [json.loads(n)["type"] for n in self.notices]


def test_sse_carries_event_notices_encoded_once_for_all_subscribers(
        recording: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.routes import results

    srv, dial = recording
    encoded: list[bytes] = []
    real = results.encode_notice

    def counting(payload: dict[str, Any]) -> bytes:
        data = real(payload)
        encoded.append(data)
        return data

    monkeypatch.setattr(results, "encode_notice", counting)
    subscribers = [Subscriber(srv) for _ in range(3)]
    for sub in subscribers:
        sub.start()
    try:
        for sub in subscribers:
            assert sub.following.wait(20), sub.error
        dial.set(class0=HIGH)
        wait_for(lambda: all("new" in s.types() for s in subscribers), what="the new notices")
        time.sleep(1.0)
        dial.set()
        wait_for(lambda: all("end" in s.types() for s in subscribers), what="the end notices")
    finally:
        for sub in subscribers:
            sub.done.set()
        for sub in subscribers:
            sub.join(20)
            assert not sub.is_alive()
    for sub in subscribers:
        assert sub.error is None, sub.error
    first = subscribers[0]
    types = first.types()
    assert types[0] == "new" and types[-1] == "end" and set(types) <= {"new", "update", "end"}, types
    notices = [json.loads(n) for n in first.notices]
    new, end = notices[0], notices[-1]
    event_id = new["after"]["id"]
    assert all(n["after"]["id"] == event_id for n in notices)
    assert new["before"] is None and new["after"]["in_progress"] and new["after"]["label"] == "class0"
    assert new["after"]["snapshot_url"] == f"/api/events/{event_id}/snapshot.jpg"
    assert not end["after"]["in_progress"] and end["after"]["end_time"] is not None
    assert end["after"]["clip_url"] == f"/api/events/{event_id}/clip.mp4"
    assert end["before"] == notices[-2]["after"], "before: the event as the previous notice showed it"
    # Every subscriber got the same notices, and each was encoded once for all of them.
    for sub in subscribers[1:]:
        assert sub.notices == first.notices
    assert len(encoded) == len(first.notices), (len(encoded), types)
    assert [e.decode().split("data: ", 1)[1].strip() for e in encoded] == first.notices


def test_a_subscriber_behind_the_kept_notices_is_told_of_the_gap() -> None:
    import asyncio

    from app.broadcast import NOTICES_KEPT, Broadcaster
    from inference.pipeline.frames import FrameHub

    loop = asyncio.new_event_loop()
    try:
        broadcaster = Broadcaster(FrameHub(80), loop)
        for n in range(1, NOTICES_KEPT + 7):
            broadcaster._add_notice(f"notice {n}".encode())
        assert broadcaster.notices == NOTICES_KEPT + 6
        assert broadcaster.notice_after(0) == (6, None)  # notices 1 to 6 are gone
        assert broadcaster.notice_after(6) == (7, b"notice 7")
        last = broadcaster.notices
        assert broadcaster.notice_after(last - 1) == (last, f"notice {last}".encode())
    finally:
        loop.close()
