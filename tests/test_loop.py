"""The inference loop run by its Service: live settings, pause/resume/stop, model switches, and
survival of faults."""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from inference.models.parse import CutsAfterParsing
from inference.pipeline.frames import Frame, FrameHub
from inference.pipeline.loop import LoopState
from inference.result import Result
from inference.service import Service, default_model_factory, default_source_factory
from inference.settings import Settings
from inference.sources.synthetic import SyntheticSource
from inference.types import Image, ModelError, ModelInfo
from tests import onnx_graphs


class FlakySource:
    """A camera that fails while ``failing`` is set (returning None or raising)."""

    name = "flaky"

    def __init__(self, raise_errors: bool = False) -> None:
        self.failing = threading.Event()
        self.raise_errors = raise_errors
        self.opens = 0
        self._inner = SyntheticSource(320, 180, fps=100)

    def open(self) -> None:
        self.opens += 1
        self._inner.open()

    def read(self) -> Image | None:
        if self.failing.is_set():
            time.sleep(0.01)
            if self.raise_errors:
                raise OSError("camera unplugged")
            return None
        return self._inner.read()

    def ready(self) -> bool:
        return not self.failing.is_set() and self._inner.ready()

    def close(self) -> None:
        self._inner.close()


class ScriptedModel(CutsAfterParsing):
    """A classification model that raises, or returns NaN, on chosen calls."""

    def __init__(self, name: str = "scripted") -> None:
        self.info = ModelInfo(name, "classification", 8, 8, "test", {0: "zero", 1: "one"})
        self.calls = 0
        self.raise_on: set[int] = set()
        self.nan_on: set[int] = set()

    def preprocess(self, frame: Image) -> Any:
        return frame[:8, :8]

    def infer(self, inputs: Any) -> dict[str, Any]:
        self.calls += 1
        if self.calls in self.raise_on:
            raise RuntimeError("inference engine hiccup")
        if self.calls in self.nan_on:
            return {"out": np.array([np.nan, 0.5], np.float32)}
        return {"out": np.array([0.3, 0.7], np.float32)}

    def parse(self, raw: dict[str, Any]) -> dict[str, Any]:
        from inference.models import parse

        return parse.classification(raw["out"])

    def close(self) -> None:
        pass


def collect(hub: FrameHub, n: int, timeout: float = 10.0) -> list[Frame]:
    out: list[Frame] = []
    seq = hub.seq
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        item = hub.wait_newer(seq, 1.0)
        if item is not None:
            out.append(item)
            seq = item.seq
    assert len(out) == n, f"only {len(out)} of {n} frames in {timeout} s"
    return out


def rendered(frame: Frame) -> bool:
    """The frame's picture was drawn (resized, overlay) already."""
    return frame._image is not None


def jpeg_size(frame: Frame, res: str) -> tuple[int, int]:
    """(width, height) of the JPEG ``frame`` holds at ``res``."""
    data = frame.jpeg(res)
    assert data is not None, f"frame {frame.seq} has no {res} JPEG"
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return int(image.shape[1]), int(image.shape[0])


@pytest.fixture
def make_loop() -> Iterator[Any]:
    """A Service (hub, loop, capture) over ``source`` and ``model``, or the default factories."""
    services: list[Service] = []

    def make(settings: Settings | None = None, source: Any = None, model: Any = None) -> Service:
        settings = settings or Settings(source="synthetic:320x180@100", display_res="native")
        service = Service(
            settings,
            source_factory=(lambda s: source) if source is not None else default_source_factory,
            model_factory=(lambda s: model) if model is not None else default_model_factory,
        )
        services.append(service)
        return service

    yield make
    for service in services:
        service.stop()
    assert not [t for t in threading.enumerate() if t.name == "inference-loop" and t.is_alive()]


def test_bikes_plays_through_the_loop_at_its_own_frame_rate(make_loop: Any) -> None:
    service = make_loop(Settings(source="demo", model="efficientnet-lite0"))
    service.prepare()
    service.start()
    items = collect(service.hub, 40)
    gaps = np.diff([i.result.timestamp for i in items[5:]])
    # bikes.mp4 is 25 fps: frames 40 ms apart, never faster; a loaded machine may be a bit slower.
    assert 0.034 < statistics.median(gaps) < 0.08
    assert 12 < items[-1].result.fps <= 27
    assert items[-1].result.model is not None and items[-1].result.model.name == "efficientnet-lite0"
    assert items[-1].image.shape == (272, 640, 3)  # drawn at its own size: never upscaled


def test_results_and_frames_share_seq_and_settings_apply_live(make_loop: Any) -> None:
    model = ScriptedModel()
    service = make_loop(source=SyntheticSource(320, 180, fps=100), model=model)
    service.start()
    item = collect(service.hub, 1)[0]
    assert item.seq == item.result.seq
    assert [i.name for i in item.result.items] == ["one", "zero"]
    service.apply({"top_k": 1, "threshold": 0.5, "display_res": "480p", "overlay": False})
    # 320x180 is below 480p: kept as is. A bigger source is drawn at 480p (see below).
    time.sleep(0.05)
    later = collect(service.hub, 3)[-1]
    assert [i.name for i in later.result.items] == ["one"]
    assert later.result.top_k == 1 and later.result.threshold == 0.5
    assert later.image.shape == (180, 320, 3)
    assert later.result.payload() == {"one": pytest.approx(0.7)}


def test_overlay_draws_only_when_on(make_loop: Any) -> None:
    source = SyntheticSource(320, 180, fps=100)
    service = make_loop(source=source, model=ScriptedModel())
    service.apply({"overlay": False})
    service.start()
    plain = collect(service.hub, 1)[0]
    n = int(plain.image[60:, :, :].sum())  # frame numbers differ only at the top
    service.apply({"overlay": True})
    time.sleep(0.05)
    drawn = collect(service.hub, 2)[-1]
    assert int(drawn.image[60:, :, :].sum()) != n


def test_overlay_and_resize_wait_for_a_consumer_and_happen_once(make_loop: Any) -> None:
    """A frame nobody looks at is neither resized nor drawn on (the idle cost); the first
    consumer draws it, every other consumer, on any thread, gets that same array."""
    service = make_loop(Settings(source="unused", display_res="480p"),
                        source=SyntheticSource(1280, 720, fps=100), model=ScriptedModel())
    service.start()
    items = collect(service.hub, 5)
    assert not any(rendered(i) for i in items)
    assert service.loop.stats.stage_ms["overlay"] == 0.0  # nothing was ever drawn
    item = items[-1]
    assert item.size == (858, 480)  # the DeepLens 480p size, not yet made
    images: list[Image] = []
    threads = [threading.Thread(target=lambda: images.append(item.image), name=f"consumer-{n}")
               for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(images) == 8 and all(image is images[0] for image in images)
    assert images[0].shape[1::-1] == item.size
    assert service.loop.stats.stage_ms["overlay"] > 0.0
    assert not rendered(items[-2])  # only what was asked for
    # The encode may take a newer frame than the one asked for (the loop runs on): it is the same
    # size and at least as new.
    encoded = service.hub.encode("native", item)
    assert encoded is not None and encoded.seq >= item.seq
    assert jpeg_size(encoded, "native") == item.size


def test_a_drawn_frame_differs_from_the_captured_one_only_where_the_overlay_is(make_loop: Any) -> None:
    source = SyntheticSource(320, 180, fps=100)
    service = make_loop(source=source, model=ScriptedModel())
    service.start()
    item = collect(service.hub, 1)[0]
    raw = item.raw
    before = raw.copy()
    drawn = item.image
    # the captured frame stays as captured (the recorder's clean snapshot): drawn on a copy
    assert item.raw is raw and np.array_equal(raw, before) and drawn is not raw
    changed = np.argwhere((drawn != before).any(axis=2))
    assert len(changed) > 0
    # the classification label sits top-left, the status line bottom-left: the right half of the
    # middle rows is untouched
    assert not ((changed[:, 0] > 70) & (changed[:, 0] < 130) & (changed[:, 1] > 200)).any()


def test_a_failing_overlay_costs_the_overlay_not_the_frame(
    make_loop: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from inference.logutil import RateLimitedLog
    from inference.pipeline import overlay, render

    def broken(*args: Any) -> None:
        raise ValueError("bad label text")

    monkeypatch.setattr(overlay, "draw_classification", broken)
    # The rate limit is the module's, for the process: start from a fresh one.
    monkeypatch.setattr(render, "_rl", RateLimitedLog(render.log))
    service = make_loop(source=SyntheticSource(320, 180, fps=100), model=ScriptedModel())
    service.start()
    items = collect(service.hub, 3)
    with caplog.at_level(logging.WARNING, logger="inference.pipeline.render"):
        images = [item.image for item in items]
    assert [image.shape for image in images] == [(180, 320, 3)] * 3
    encoded = service.hub.encode("native", items[-1])  # a viewer still gets the frame
    assert encoded is not None and encoded.jpeg("native") is not None
    lines = [r for r in caplog.records if "overlay not drawn: bad label text" in r.getMessage()]
    assert len(lines) == 1  # rate-limited, not one line per frame


def test_pause_resume_stop_start(make_loop: Any) -> None:
    service = make_loop(source=SyntheticSource(160, 90, fps=100), model=ScriptedModel())
    service.start()
    collect(service.hub, 3)
    assert service.pipeline("pause") is LoopState.PAUSED
    time.sleep(0.3)
    assert service.state is LoopState.PAUSED
    seq = service.hub.seq
    time.sleep(0.3)
    assert service.hub.seq == seq
    assert service.pipeline("resume") is LoopState.RUNNING
    assert service.state is LoopState.RUNNING
    collect(service.hub, 3)
    assert service.pipeline("stop") is LoopState.STOPPED
    assert service.state is LoopState.STOPPED
    assert service.pipeline("start") is LoopState.RUNNING
    collect(service.hub, 2)
    assert service.state is LoopState.RUNNING
    # The whole service stopped and started again (the capture closed and reopened) runs too.
    service.stop()
    assert service.state is LoopState.STOPPED
    service.start()
    collect(service.hub, 2)
    assert service.state is LoopState.RUNNING


def test_model_errors_are_counted_shown_and_survived(make_loop: Any) -> None:
    model = ScriptedModel()
    model.raise_on = {3, 4}
    model.nan_on = {6}
    service = make_loop(source=SyntheticSource(160, 90, fps=100), model=model)
    service.start()
    items = collect(service.hub, 10)
    errors = [i.result.error for i in items if i.result.error]
    assert len(errors) == 3
    assert "inference engine hiccup" in errors[0]
    assert "NaN" in errors[2]
    stats = service.loop.stats
    assert stats.model_errors == 3
    assert stats.last_model_error is not None and "NaN" in stats.last_model_error
    assert items[-1].result.error is None and items[-1].result.items


def test_switching_to_a_broken_model_keeps_the_old_one(make_loop: Any, tmp_path: Path) -> None:
    service = make_loop(
        Settings(source="synthetic:160x90@100", model="efficientnet-lite0", display_res="native")
    )
    service.prepare()
    service.start()
    collect(service.hub, 2)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelError, match="broken.onnx"):
        service.apply({"model": str(broken), "model_type": "classification"})
    assert service.settings.model == "efficientnet-lite0"
    after = collect(service.hub, 2)[-1]
    assert after.result.model is not None and after.result.model.name == "efficientnet-lite0"
    assert after.result.error is None
    good = tmp_path / "colour.onnx"
    good.write_bytes(onnx_graphs.classifier())
    service.apply({"model": str(good), "model_type": "classification"})
    time.sleep(0.05)
    switched = collect(service.hub, 2)[-1]
    assert switched.result.model is not None and switched.result.model.name == "colour"


@pytest.mark.parametrize("raise_errors", [False, True])
def test_camera_loss_shows_no_signal_and_recovers(make_loop: Any, raise_errors: bool) -> None:
    source = FlakySource(raise_errors)
    service = make_loop(source=source, model=ScriptedModel())
    service.start()
    collect(service.hub, 3)
    source.failing.set()
    lost = collect(service.hub, 5)
    assert all((i.result.error or "").startswith("no signal") for i in lost[1:])
    assert service.capture.consecutive_failures >= 3
    assert service.capture.last_error is not None
    # The NO SIGNAL frame keeps the display size so viewers see no jump.
    assert lost[-1].image.shape == (180, 320, 3)
    assert source.opens >= 2  # reopened after repeated failures
    assert service.capture.reopens >= 1
    source.failing.clear()
    back = collect(service.hub, 3)
    assert back[-1].result.error is None and back[-1].result.items
    assert service.capture.consecutive_failures == 0 and service.capture.last_error is None
    assert service.state is LoopState.RUNNING


def test_source_switch_swaps_on_success(make_loop: Any) -> None:
    # The default source factory: "synthetic:160x90@100" is a SyntheticSource(160, 90, fps=100).
    service = make_loop(Settings(source="synthetic:160x90@100", display_res="native"),
                        model=ScriptedModel())
    service.start()
    assert collect(service.hub, 2)[-1].image.shape[:2] == (90, 160)
    with pytest.raises(Exception, match="is no file"):
        service.apply({"source": "/no/such/video.mp4"})
    assert service.settings.source == "synthetic:160x90@100"
    service.apply({"source": "synthetic:200x100@100"})
    time.sleep(0.1)
    assert collect(service.hub, 2)[-1].image.shape[:2] == (100, 200)


def test_hub_encodes_lazily_and_once_per_resolution(make_loop: Any) -> None:
    service = make_loop(source=SyntheticSource(1280, 720, fps=100), model=ScriptedModel())
    service.start()
    collect(service.hub, 5)
    assert service.hub.total_encodes == 0  # nobody asked: nothing encoded
    service.pipeline("pause")
    time.sleep(0.3)
    a = service.hub.encode("480p")
    b = service.hub.encode("480p")
    c = service.hub.encode("native")
    assert a is not None and b is not None and c is not None
    assert a is b is c  # the paused loop's last frame, holding both JPEGs
    assert a.jpeg("480p") is b.jpeg("480p")
    assert service.hub.encodes["480p"] == 1 and service.hub.encodes["native"] == 1
    assert jpeg_size(a, "480p") == (858, 480) and jpeg_size(c, "native") == (1280, 720)


def test_a_resolution_above_the_frame_shares_its_native_jpeg() -> None:
    # An upscale would only cost CPU and bandwidth: 480p of a 320x180 frame is its native JPEG.
    hub = FrameHub()
    image = np.zeros((180, 320, 3), np.uint8)
    hub.publish(image, Result(seq=1, timestamp=time.time(), model=None, frame_size=(320, 180)))
    a = hub.encode("480p")
    c = hub.encode("native")
    assert a is not None and a is c and a.effective_res("480p") == "native"
    assert a.jpeg("480p") is c.jpeg("native")
    assert hub.encodes["480p"] == 0 and hub.encodes["native"] == 1
    assert jpeg_size(a, "480p") == (320, 180)


def test_large_frames_are_drawn_at_the_display_resolution(make_loop: Any) -> None:
    service = make_loop(source=SyntheticSource(1920, 1080, fps=100), model=ScriptedModel())
    service.apply({"display_res": "480p"})
    service.start()
    assert collect(service.hub, 2)[-1].image.shape == (480, 858, 3)
    service.apply({"display_res": "native"})
    time.sleep(0.05)
    assert collect(service.hub, 2)[-1].image.shape == (1080, 1920, 3)


def test_a_failed_source_in_the_same_change_keeps_the_old_model(make_loop: Any, tmp_path: Path) -> None:
    service = make_loop(
        Settings(source="synthetic:160x90@100", model="efficientnet-lite0", display_res="native")
    )
    service.prepare()
    service.start()
    collect(service.hub, 2)
    good = tmp_path / "colour.onnx"
    good.write_bytes(onnx_graphs.classifier())
    with pytest.raises(Exception, match="is no file"):
        service.apply({"model": str(good), "model_type": "classification",
                       "source": "/no/such/clip.mp4"})
    assert service.settings.model == "efficientnet-lite0"
    assert service.settings.source == "synthetic:160x90@100"
    after = collect(service.hub, 2)[-1]
    assert after.result.model is not None and after.result.model.name == "efficientnet-lite0"


def test_health_reports_a_model_error_as_recent_only_for_a_while() -> None:
    """The loop records when its last model error happened; /health counts it as a fault for
    MODEL_ERROR_WINDOW seconds after that, however often it is asked, and not an hour later."""
    from app.routes.health import MODEL_ERROR_WINDOW, health_report

    service = Service(Settings(source="synthetic"), model_factory=lambda s: ScriptedModel())
    service.prepare()
    stats = service.loop.stats

    def model_reasons() -> list[str]:
        return [r for r in health_report(service)["reasons"] if r.startswith("model:")]

    assert model_reasons() == []
    stats.model_failed("model error: boom")
    for _ in range(3):  # asking does not change the answer
        assert model_reasons() == [f"model: errors in the last {MODEL_ERROR_WINDOW:.0f} s: "
                                   "model error: boom"]
    stats.last_model_error_at = time.monotonic() - 3600  # the same error, an hour ago
    assert model_reasons() == []
    assert health_report(service)["checks"]["model"]["errors"] == 1


def test_each_result_names_the_file_its_frame_came_from(make_loop: Any, tmp_path: Path) -> None:
    # A slideshow that moves on every 20 ms: a name looked up when the result is made (or read)
    # would often belong to the next picture.
    from tests.test_sources import colour_folder, colour_of

    folder = colour_folder(tmp_path / "imgs")
    settings = Settings(source=str(folder), source_fps=200, slide_interval=0.02,
                        display_res="native", overlay=False)
    service = make_loop(settings, model=ScriptedModel())
    frames: list[Frame] = []
    service.hub.add_listener(lambda seq: frames.append(service.hub.latest()))
    service.start()
    deadline = time.monotonic() + 10
    while len({f.result.origin.name for f in frames if f.result.origin}) < 3:
        assert time.monotonic() < deadline, "the slideshow never showed every file"
        time.sleep(0.02)
    service.stop()
    assert len(frames) > 10
    for frame in frames:
        origin = frame.result.origin
        assert origin is not None and origin.name == colour_of(frame.image)
        assert frame.result.to_json()["source"] == {"name": origin.name, "path": str(folder / origin.name)}


def test_a_folder_walked_once_ends_without_no_signal(make_loop: Any, tmp_path: Path) -> None:
    from inference.sources import make_source
    from tests.test_sources import COLOURS, colour_folder

    folder = colour_folder(tmp_path / "imgs")
    settings = Settings(source=str(folder), display_res="native", overlay=False)
    service = make_loop(settings, source=make_source(str(folder), once=True), model=ScriptedModel())
    frames: list[Frame] = []
    service.hub.add_listener(lambda seq: frames.append(service.hub.latest()))
    service.start()
    deadline = time.monotonic() + 10
    while not service.loop.source_ended:
        assert time.monotonic() < deadline, "the walk never ended"
        time.sleep(0.01)
    time.sleep(0.2)
    assert [f.result.origin.name for f in frames if f.result.origin] == sorted(COLOURS)
    assert len(frames) == 3 and all(f.result.error is None for f in frames)
    assert service.capture.failures == 0


def test_a_synthetic_frame_names_no_file(make_loop: Any) -> None:
    service = make_loop(model=ScriptedModel())
    service.start()
    frame = collect(service.hub, 1)[0]
    assert frame.result.origin is None and frame.result.to_json()["source"] is None
