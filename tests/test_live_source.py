"""A live source switch behaves as the command line (issue 15.21): a camera or stream that is
down is taken and retried by the loop, and one that is slow to connect never holds the request
or the control lock; a file that cannot be read is still refused at once."""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

import httpx
import numpy as np

from inference.service import default_source_factory
from inference.settings import Settings
from inference.types import Image
from tests.conftest import free_port
from tests.test_server import TOKEN, running_server

SLOW = "rtsp://127.0.0.1:9/slow"  # only ever opened by the fake below


class SlowStream:
    """A stream whose open blocks until the test lets it connect (RTSP takes seconds)."""

    live = True

    def __init__(self, gate: threading.Event) -> None:
        self.name = SLOW
        self.gate = gate
        self.opened = threading.Event()

    def open(self) -> None:
        if not self.gate.wait(30):
            raise OSError("never connected")
        self.opened.set()

    def read(self) -> Optional[Image]:
        time.sleep(0.02)
        return np.full((120, 160, 3), 90, np.uint8)

    def ready(self) -> bool:
        return False

    def close(self) -> None:
        pass


def test_a_stream_that_is_down_is_taken_and_retried_not_refused() -> None:
    down = f"rtsp://127.0.0.1:{free_port()}/live"  # nothing listens there
    with running_server() as srv, srv.client(TOKEN) as client:
        srv.wait_frames(1)
        response = client.patch("/api/config", json={"source": down})
        assert response.status_code == 200, response.text
        assert client.get("/api/config").json()["source"] == down
        deadline = time.monotonic() + 20
        while srv.service.capture.failures < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.service.capture.failures >= 2  # the loop keeps trying, as it does at start
        error = client.get("/results").json()["error"]
        assert error and "no signal" in error.lower()


def test_a_slow_stream_holds_neither_the_request_nor_the_control_lock() -> None:
    gate = threading.Event()
    made: list[SlowStream] = []

    def factory(settings: Settings) -> Any:
        if settings.source == SLOW:
            made.append(SlowStream(gate))
            return made[-1]
        return default_source_factory(settings)

    with running_server(source_factory=factory) as srv, srv.client(TOKEN) as client:
        srv.wait_frames(1)
        try:
            response = client.patch("/api/config", json={"source": SLOW}, timeout=5.0)
            assert response.status_code == 200, response.text
            assert made and not made[0].opened.is_set()  # answered before it connected
            other = client.patch("/api/config", json={"threshold": 0.2}, timeout=5.0)
            assert other.status_code == 200, other.text
        except httpx.TimeoutException:  # pragma: no cover - the failure this test is about
            raise AssertionError("the source switch held the request while the stream connected") from None
        finally:
            gate.set()
        assert made[0].opened.wait(10)
        srv.wait_frames(3)
        frame = srv.service.hub.latest()
        assert frame is not None and frame.result.error is None


def test_an_unreadable_file_is_still_refused_at_once(tmp_path: Any) -> None:
    with running_server() as srv, srv.client(TOKEN) as client:
        missing = str(tmp_path / "missing.mp4")
        response = client.patch("/api/config", json={"source": missing})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "source"]
