"""Faults injected into a running dashboard (real uvicorn on loopback): the loop keeps running on
its own thread, /health names what is wrong, and everything recovers without a restart.

What other files already prove is not repeated here (see README, "Reliability and security"):
camera loss at loop level (test_loop, test_device), model errors and NaN at loop level
(test_loop), MQTT broker down at start / killed / back (test_iot), Greengrass IPC raising
(test_iot), FIFO reader absent / leaving / stuck and the path replaced by a file (test_fifo),
the MJPEG viewer cap and a departing viewer (test_stream).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import psutil
import pytest

from inference.models import load_model
from inference.models import parse as parsers
from inference.outputs import build_outputs
from inference.service import Service
from inference.settings import Settings
from inference.sources.synthetic import SyntheticSource
from inference.types import Image, ModelInfo
from tests import onnx_graphs
from tests.conftest import free_port
from tests.test_server import (
    TOKEN,
    PartReader,
    Running,
    fake_model_factory,
    running_server,
    serve_runtime,
)


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll (bounded) until ``predicate()`` is truthy; its value, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def loop_thread(srv: Running) -> threading.Thread:
    thread = srv.service.loop._thread
    assert thread is not None and thread.is_alive()
    return thread


# -- camera ------------------------------------------------------------------------------------------
class ScriptedCamera:
    """``getLastFrame`` as a test wants it: failing for a number of reads, until a time, or until
    ``broken`` is cleared; failing by returning nothing or by raising."""

    name = "scripted-camera"

    def __init__(self, raises: bool) -> None:
        self.raises = raises
        self.fail_reads = 0
        self.fail_until = 0.0
        self.broken = threading.Event()
        self.failures = 0
        self._inner = SyntheticSource(320, 180, fps=60)

    def open(self) -> None:
        self._inner.open()

    def read(self) -> Image | None:
        failing = self.broken.is_set() or time.monotonic() < self.fail_until
        if not failing and self.fail_reads > 0:
            self.fail_reads -= 1
            failing = True
        if failing:
            self.failures += 1
            time.sleep(0.01)
            if self.raises:
                raise OSError("getLastFrame failed: camera unplugged")
            return None
        return self._inner.read()

    def ready(self) -> bool:
        return self._inner.ready()

    def close(self) -> None:
        self._inner.close()


def _health(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/health")
    assert response.status_code == 200
    data: dict[str, Any] = response.json()
    return data


def _degraded(client: httpx.Client) -> dict[str, Any] | None:
    health = _health(client)
    return health if health["status"] == "degraded" else None


@pytest.mark.parametrize("raises", [False, True], ids=["returns-nothing", "raises"])
@pytest.mark.parametrize("how", ["once", "for-a-while", "for-good-then-fixed"])
def test_camera_failing_shows_no_signal_and_recovers_without_restart(how: str, raises: bool) -> None:
    camera = ScriptedCamera(raises)
    with running_server(source_factory=lambda s: camera) as srv, srv.client() as client:
        srv.wait_frames(3)
        thread = loop_thread(srv)
        if how == "once":
            camera.fail_reads = 1
            wait_until(lambda: camera.failures == 1 and srv.service.loop.stats.frames > 0, "one failure")
        elif how == "for-a-while":  # the "10 s", shortened: the shape is the same
            camera.fail_until = time.monotonic() + 1.5
        else:
            camera.broken.set()
        if how != "once":
            health = wait_until(
                lambda: _degraded(client), "degraded health")
            reason = " | ".join(health["reasons"])
            assert "camera:" in reason and ("unplugged" in reason or "no frame from" in reason), reason
            assert not health["checks"]["camera"]["ok"]
            result = client.get("/results").json()
            assert result["error"].startswith("no signal"), result
            snapshot = client.get("/snapshot.jpg")  # the NO SIGNAL frame, still a JPEG
            assert snapshot.status_code == 200 and snapshot.content[:2] == b"\xff\xd8"
            if how == "for-good-then-fixed":
                seq = srv.wait_frames(2)  # still failing, still publishing NO SIGNAL frames
                assert client.get("/results").json()["seq"] >= seq
                assert srv.service.capture.reopens >= 1
                camera.broken.clear()
        wait_until(lambda: client.get("/results").json()["error"] is None, "a real frame again")
        wait_until(lambda: _health(client)["status"] == "ok", "health ok again")
        assert loop_thread(srv) is thread, "recovered by the same loop, not a restart"
        assert srv.service.capture.consecutive_failures == 0
        assert srv.service.capture.failures >= 1


# -- video files -------------------------------------------------------------------------------------
def _write_clip(path: Path, frames: int = 6) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (96, 64))
    for i in range(frames):
        writer.write(np.full((64, 96, 3), (30 + i * 10) % 256, np.uint8))
    writer.release()
    return path


def test_a_video_file_that_ends_loops_and_a_corrupt_one_is_refused_live(tmp_path: Path) -> None:
    clip = _write_clip(tmp_path / "short.avi")
    with running_server(source=str(clip), source_fps=0.0) as srv, srv.client(TOKEN) as client:
        srv.wait_frames(20)  # six frames, looped at least three times
        source = srv.service.capture.source
        assert getattr(source, "loops", 0) >= 3
        assert client.get("/results").json()["error"] is None
        corrupt = tmp_path / "corrupt.mp4"
        corrupt.write_bytes(bytes(range(256)) * 64)
        refused = client.patch("/api/config", json={"source": str(corrupt)})
        assert refused.status_code == 422
        [error] = refused.json()["detail"]
        assert error["loc"] == ["body", "source"] and "corrupt.mp4" in error["msg"]
        assert srv.service.settings.source == str(clip)
        seq = srv.wait_frames(3)
        assert client.get("/results").json()["seq"] >= seq and client.get("/results").json()["error"] is None


def test_a_truncated_video_shows_no_signal_until_a_good_source_is_set(tmp_path: Path) -> None:
    """A file cut mid-way (an interrupted copy) cannot be opened: the CLI refuses it at start
    (test_cli); a service that comes up anyway (the Lambda) shows NO SIGNAL with the reason and
    takes a good source live."""
    whole = _write_clip(tmp_path / "whole.avi", frames=20)
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with running_server(source=str(cut), source_fps=0.0) as srv, srv.client(TOKEN) as client:
        srv.wait_frames(2)
        result = client.get("/results").json()
        assert result["error"].startswith("no signal") and "cut.avi" in result["error"], result
        health = _health(client)
        assert any(r.startswith("camera:") and "cut.avi" in r for r in health["reasons"]), health
        assert client.get("/snapshot.jpg").status_code == 200
        assert client.patch("/api/config", json={"source": str(whole)}).status_code == 200
        wait_until(lambda: client.get("/results").json()["error"] is None, "frames from the good file")
        wait_until(lambda: _health(client)["status"] == "ok", "health ok")


# -- a network camera that drops -----------------------------------------------------------------------
@contextmanager
def upstream_camera(port: int) -> Iterator[Running]:
    """A dashboard serving MJPEG on ``port``: the 'IP camera' another dashboard reads over HTTP."""
    settings = Settings(source="synthetic:320x180@30", host="127.0.0.1", port=port, token=TOKEN,
                        fifo="off", iot="off", log_level="warning")
    service = Service(settings, model_factory=fake_model_factory)
    with serve_runtime(service) as srv:
        yield srv


def test_a_network_stream_that_drops_and_comes_back() -> None:
    port = free_port()
    up = upstream_camera(port)
    up.__enter__()
    try:
        with running_server(source=f"http://127.0.0.1:{port}/stream.mjpg") as srv, srv.client() as client:
            wait_until(lambda: client.get("/results").json()["error"] is None, "frames from the stream")
            thread = loop_thread(srv)
            up.__exit__(None, None, None)  # the camera goes away mid-stream
            health = wait_until(
                lambda: _degraded(client), "the drop to show")
            assert any(r.startswith("camera:") for r in health["reasons"]), health
            assert client.get("/results").json()["error"].startswith("no signal")
            up = upstream_camera(port)  # back on the same address
            up.__enter__()
            wait_until(lambda: client.get("/results").json()["error"] is None, "the stream back", 40)
            wait_until(lambda: _health(client)["status"] == "ok", "health ok again")
            assert loop_thread(srv) is thread
    finally:
        up.__exit__(None, None, None)


# -- the model -------------------------------------------------------------------------------------------
class MalformedModel(parsers.CutsAfterParsing):
    """Runs the real parsers on outputs a broken model could give, one script entry per frame."""

    def __init__(self, kind: str, script: list[Any]) -> None:
        labels = {0: "zero", 1: "one", 2: "two"}
        self.info = ModelInfo("malformed", kind, 8, 8, "test", labels)  # type: ignore[arg-type]
        self.kind = kind
        self.script = script
        self.calls = 0

    def preprocess(self, frame: Image) -> Any:
        return frame[:8, :8]

    def infer(self, inputs: Any) -> dict[str, Any]:
        out = self.script[self.calls % len(self.script)]
        self.calls += 1
        if isinstance(out, Exception):
            raise out
        return out  # type: ignore[no-any-return]

    def parse(self, raw: dict[str, Any]) -> dict[str, Any]:
        if self.kind == "classification":
            return parsers.classification(raw["out"])
        if self.kind == "ssd":
            return parsers.ssd_from_rows(raw["out"], 8, 8)
        return parsers.segmentation(raw["out"])

    def close(self) -> None:
        pass


GOOD = {
    "classification": {"out": np.array([0.2, 0.7, 0.1], np.float32)},
    "ssd": {"out": np.array([[[[0, 1, 0.9, 0.1, 0.1, 0.5, 0.5]]]], np.float32)},
    "segmentation": {"out": np.zeros((1, 3, 4, 4), np.float32)},
}
BAD: dict[str, list[Any]] = {
    "classification": [
        {"out": np.array([np.nan, 0.5, 0.5], np.float32)},
        {"out": np.array([np.inf, 0.5, 0.5], np.float32)},
        {"wrong-name": np.array([0.5, 0.5], np.float32)},
        {"out": np.array(["a", "b"])},
        RuntimeError("inference engine hiccup"),
    ],
    "ssd": [
        {"out": np.ones((2, 5), np.float32)},  # rows of 5, not 7
        {"out": np.full((1, 7), np.nan, np.float32)},  # dropped: no detection, no error
        MemoryError("out of device memory"),
    ],
    "segmentation": [
        {"out": np.zeros((5,), np.float32)},
        {"out": np.zeros((2, 3, 4, 4), np.float32)},
    ],
}


@pytest.mark.parametrize("kind", ["classification", "ssd", "segmentation"])
def test_a_model_raising_or_giving_malformed_output_is_survived(kind: str) -> None:
    script = [GOOD[kind]]
    for bad in BAD[kind]:
        script += [bad, GOOD[kind]]
    model = MalformedModel(kind, script)
    with running_server(model_factory=lambda s: model) as srv, srv.client() as client:
        srv.wait_frames(len(script) * 2)
        thread = loop_thread(srv)
        stats = srv.service.loop.stats
        assert stats.model_errors >= 1
        health = _health(client)
        assert health["status"] == "degraded"
        assert any(r.startswith("model: errors in the last") for r in health["reasons"]), health
        # Every answer is valid JSON, whatever the model gave on the frame it shows.
        for _ in range(len(script)):
            results = client.get("/results")
            assert results.status_code == 200 and results.json()["seq"] >= 1
            srv.wait_frames(1)
        assert client.get("/metrics").status_code == 200
        assert loop_thread(srv) is thread
    errors = [e for e in (stats.last_model_error,) if e]
    assert errors and errors[0].startswith("model error:")


def test_a_model_switch_to_a_broken_file_keeps_the_old_model_and_shows_the_error(tmp_path: Path) -> None:
    """With the real loader: truncated ONNX, text, and an empty file; the old model keeps going."""
    good = onnx_graphs.classifier()
    files = {"cut.onnx": good[: len(good) // 2], "text.onnx": b"not a model at all", "empty.onnx": b""}
    with running_server(model="catdog", model_factory=load_model) as srv, srv.client(TOKEN) as client:
        srv.wait_frames(2)
        for name, data in files.items():
            path = tmp_path / name
            path.write_bytes(data)
            response = client.patch("/api/config", json={"model": str(path)})
            assert response.status_code == 422, response.text
            [error] = response.json()["detail"]
            assert error["loc"] == ["body", "model"] and name in error["msg"], error
            seq = srv.wait_frames(2)
            result = client.get("/results").json()
            assert result["seq"] >= seq and result["model"]["name"] == "catdog" and result["error"] is None
            assert _health(client)["status"] == "ok"
        assert client.get("/api/config").json()["model"] == "catdog"


# -- outputs seen from the dashboard --------------------------------------------------------------------
def test_fifo_path_replaced_by_a_file_shows_in_health_and_the_loop_goes_on(tmp_path: Path) -> None:
    fifo = tmp_path / "results.mjpeg"
    settings = Settings(source="synthetic:320x180@60", host="127.0.0.1", port=free_port(), token=TOKEN,
                        fifo=str(fifo), iot="off", log_level="warning")
    service = Service(settings, model_factory=fake_model_factory)
    for output in build_outputs(settings, service.hub):
        service.add_output(output)
    with serve_runtime(service) as srv, srv.client() as client:
        wait_until(lambda: fifo.exists(), "the FIFO to be made")
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            wait_until(lambda: client.get("/api/stats").json()["outputs"]["fifo"]["frames_written"] > 2,
                       "frames in the FIFO")
        finally:
            os.close(reader)
        fifo.unlink()
        fifo.write_bytes(b"someone's notes")
        health = wait_until(lambda: _degraded(client), "the fault")
        assert any("fifo" in r and "not a FIFO" in r for r in health["reasons"]), health
        seq = srv.wait_frames(10)
        assert client.get("/results").json()["seq"] >= seq
        assert fifo.read_bytes() == b"someone's notes"


# -- clients ------------------------------------------------------------------------------------------------
def _stalled_viewer(url: str, path: str = "/stream.mjpg") -> socket.socket:
    host, port = url.split("//", 1)[1].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return sock


def test_200_viewers_that_never_read_do_not_hold_up_the_loop_or_other_viewers() -> None:
    with running_server(source="synthetic:640x360@30", max_viewers=300) as srv, srv.client() as client:
        srv.wait_frames(2)
        stalled = [_stalled_viewer(srv.url) for _ in range(200)]
        stalled.append(_stalled_viewer(srv.url, "/results/events"))
        try:
            wait_until(lambda: len(client.get("/api/stats").json()["viewers"]) == 200, "200 viewers")
            srv.wait_frames(30)  # their buffers fill; nothing reads
            rss_before = psutil.Process().memory_info().rss
            published = srv.service.hub.published
            srv.wait_frames(150)
            assert srv.service.hub.published - published >= 150  # the loop never waited
            with srv.client() as watcher, watcher.stream("GET", "/stream.mjpg") as response:
                reader = PartReader(response.iter_bytes())
                seqs = [reader.next().seq for _ in range(10)]
            assert seqs == sorted(set(seqs))
            assert client.get("/results").status_code == 200
            growth = psutil.Process().memory_info().rss - rss_before
            # Queuing per viewer would be 200 x 150 frames x ~30 KB = ~900 MB; we keep none.
            assert growth < 150 * 2**20, f"memory grew {growth / 2**20:.0f} MB with stalled viewers"
        finally:
            for sock in stalled:
                sock.close()
        wait_until(lambda: client.get("/api/stats").json()["viewers"] == [], "the stalled to be dropped")


def test_viewers_that_disconnect_mid_part(caplog: pytest.LogCaptureFixture) -> None:
    with running_server(source="synthetic:640x360@30") as srv, srv.client() as client:
        srv.wait_frames(2)
        for i in range(30):
            sock = _stalled_viewer(srv.url)
            sock.settimeout(10)
            got = b""
            while b"Content-Type: image/jpeg" not in got:
                got += sock.recv(4096)
            got += sock.recv(100)  # a few bytes into the JPEG
            if i % 2:  # half of them reset the connection instead of closing it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()
        wait_until(lambda: client.get("/api/stats").json()["viewers"] == [], "every viewer dropped")
        with client.stream("GET", "/stream.mjpg") as response:
            PartReader(response.iter_bytes()).next()
        assert srv.service.loop.state.value == "running"
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text


def test_a_flood_of_results_requests() -> None:
    with running_server() as srv:
        srv.wait_frames(2)
        statuses: list[int] = []
        lock = threading.Lock()

        def flood() -> None:
            with srv.client() as client:
                for _ in range(100):
                    code = client.get("/results").status_code
                    with lock:
                        statuses.append(code)

        published = srv.service.hub.published
        workers = [threading.Thread(target=flood, name=f"flood-{i}") for i in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert not any(w.is_alive() for w in workers)
        assert len(statuses) == 800 and set(statuses) == {200}
        assert srv.service.hub.published > published  # frames kept coming meanwhile
        with srv.client() as client:
            assert client.get("/health").json()["status"] == "ok"
