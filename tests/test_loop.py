"""InferenceLoop: live settings, pause/resume/stop, model switches, and survival of faults."""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.config import Settings
from inference.hub import FrameHub, Published
from inference.loop import InferenceLoop, LoopState, default_source_factory
from inference.models import load_model
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

    def close(self) -> None:
        self._inner.close()


class ScriptedModel:
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


def collect(hub: FrameHub, n: int, timeout: float = 10.0) -> list[Published]:
    out: list[Published] = []
    seq = hub.seq
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        item = hub.wait_newer(seq, 1.0)
        if item is not None:
            out.append(item)
            seq = item.seq
    assert len(out) == n, f"only {len(out)} of {n} frames in {timeout} s"
    return out


@pytest.fixture
def make_loop() -> Iterator[Any]:
    loops: list[InferenceLoop] = []

    def make(settings: Settings | None = None, source: Any = None, model: Any = None) -> InferenceLoop:
        settings = settings or Settings(source="synthetic:320x180@100", display_res="native")
        loop = InferenceLoop(
            settings,
            source_factory=(lambda s: source) if source is not None else default_source_factory,
            model_factory=(lambda s: model) if model is not None else load_model,
        )
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.close()
    assert not [t for t in threading.enumerate() if t.name == "inference-loop" and t.is_alive()]


def test_bikes_plays_through_the_loop_at_its_own_frame_rate(make_loop: Any) -> None:
    loop = make_loop(Settings(source="demo", model="efficientnet-lite0"))
    loop.prepare()
    loop.start()
    items = collect(loop.hub, 40)
    gaps = np.diff([i.result.timestamp for i in items[5:]])
    # bikes.mp4 is 25 fps: frames 40 ms apart, never faster; a loaded machine may be a bit slower.
    assert 0.034 < statistics.median(gaps) < 0.08
    assert 12 < items[-1].result.fps <= 27
    assert items[-1].result.model is not None and items[-1].result.model.name == "efficientnet-lite0"
    assert items[-1].image.shape == (272, 640, 3)  # drawn at its own size: never upscaled


def test_results_and_frames_share_seq_and_settings_apply_live(make_loop: Any) -> None:
    model = ScriptedModel()
    loop = make_loop(source=SyntheticSource(320, 180, fps=100), model=model)
    loop.start()
    item = collect(loop.hub, 1)[0]
    assert item.seq == item.result.seq
    assert [i.name for i in item.result.items] == ["one", "zero"]
    loop.update({"top_k": 1, "threshold": 0.5, "display_res": "480p", "overlay": False})
    # 320x180 is below 480p: kept as is. A bigger source is drawn at 480p (see below).
    time.sleep(0.05)
    later = collect(loop.hub, 3)[-1]
    assert [i.name for i in later.result.items] == ["one"]
    assert later.result.top_k == 1 and later.result.threshold == 0.5
    assert later.image.shape == (180, 320, 3)
    assert later.result.payload() == {"one": pytest.approx(0.7)}


def test_overlay_draws_only_when_on(make_loop: Any) -> None:
    source = SyntheticSource(320, 180, fps=100)
    loop = make_loop(source=source, model=ScriptedModel())
    loop.update({"overlay": False})
    loop.start()
    plain = collect(loop.hub, 1)[0]
    n = int(plain.image[60:, :, :].sum())  # frame numbers differ only at the top
    loop.update({"overlay": True})
    time.sleep(0.05)
    drawn = collect(loop.hub, 2)[-1]
    assert int(drawn.image[60:, :, :].sum()) != n


def test_overlay_and_resize_wait_for_a_consumer_and_happen_once(make_loop: Any) -> None:
    """A frame nobody looks at is neither resized nor drawn on (the idle cost); the first
    consumer draws it, every other consumer, on any thread, gets that same array."""
    loop = make_loop(Settings(source="unused", display_res="480p"),
                     source=SyntheticSource(1280, 720, fps=100), model=ScriptedModel())
    loop.start()
    items = collect(loop.hub, 5)
    assert not any(i.rendered for i in items)
    assert loop.stats.stage_ms["overlay"] == 0.0  # nothing was ever drawn
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
    assert loop.stats.stage_ms["overlay"] > 0.0
    assert not items[-2].rendered  # only what was asked for
    encoded = loop.hub.jpeg("native", item)
    assert encoded is not None and (encoded.width, encoded.height) == item.size


def test_a_drawn_frame_differs_from_the_captured_one_only_where_the_overlay_is(make_loop: Any) -> None:
    source = SyntheticSource(320, 180, fps=100)
    loop = make_loop(source=source, model=ScriptedModel())
    loop.start()
    item = collect(loop.hub, 1)[0]
    raw = item._raw
    assert raw is not None
    before = raw.copy()
    drawn = item.image
    assert item._raw is None  # the captured frame is let go once drawn
    changed = np.argwhere((drawn != before).any(axis=2))
    assert len(changed) > 0
    # the classification label sits top-left, the status line bottom-left: the right half of the
    # middle rows is untouched
    assert not ((changed[:, 0] > 70) & (changed[:, 0] < 130) & (changed[:, 1] > 200)).any()


def test_a_failing_overlay_costs_the_overlay_not_the_frame(
    make_loop: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from inference import overlay

    def broken(*args: Any) -> None:
        raise ValueError("bad label text")

    monkeypatch.setattr(overlay, "draw_classification", broken)
    loop = make_loop(source=SyntheticSource(320, 180, fps=100), model=ScriptedModel())
    loop.start()
    items = collect(loop.hub, 3)
    with caplog.at_level(logging.WARNING, logger="inference.loop"):
        images = [item.image for item in items]
    assert [image.shape for image in images] == [(180, 320, 3)] * 3
    assert loop.hub.jpeg("native", items[-1]) is not None  # a viewer still gets the frame
    lines = [r for r in caplog.records if "overlay not drawn: bad label text" in r.getMessage()]
    assert len(lines) == 1  # rate-limited, not one line per frame


def test_pause_resume_stop_start(make_loop: Any) -> None:
    loop = make_loop(source=SyntheticSource(160, 90, fps=100), model=ScriptedModel())
    loop.start()
    collect(loop.hub, 3)
    loop.pause()
    time.sleep(0.3)
    assert loop.state is LoopState.PAUSED
    seq = loop.hub.seq
    time.sleep(0.3)
    assert loop.hub.seq == seq
    loop.resume()
    assert loop.state is LoopState.RUNNING
    collect(loop.hub, 3)
    loop.stop()
    assert loop.state is LoopState.STOPPED
    loop.start()
    collect(loop.hub, 2)
    assert loop.state is LoopState.RUNNING


def test_model_errors_are_counted_shown_and_survived(make_loop: Any) -> None:
    model = ScriptedModel()
    model.raise_on = {3, 4}
    model.nan_on = {6}
    loop = make_loop(source=SyntheticSource(160, 90, fps=100), model=model)
    loop.start()
    items = collect(loop.hub, 10)
    errors = [i.result.error for i in items if i.result.error]
    assert len(errors) == 3
    assert "inference engine hiccup" in errors[0]
    assert "NaN" in errors[2]
    assert loop.stats.model_errors == 3
    assert items[-1].result.error is None and items[-1].result.items


def test_switching_to_a_broken_model_keeps_the_old_one(make_loop: Any, tmp_path: Path) -> None:
    loop = make_loop(
        Settings(source="synthetic:160x90@100", model="efficientnet-lite0", display_res="native")
    )
    loop.prepare()
    loop.start()
    collect(loop.hub, 2)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelError, match="broken.onnx"):
        loop.update({"model": str(broken), "model_type": "classification"})
    assert loop.settings.model == "efficientnet-lite0"
    after = collect(loop.hub, 2)[-1]
    assert after.result.model is not None and after.result.model.name == "efficientnet-lite0"
    assert after.result.error is None
    good = tmp_path / "colour.onnx"
    good.write_bytes(onnx_graphs.classifier())
    loop.update({"model": str(good), "model_type": "classification"})
    time.sleep(0.05)
    switched = collect(loop.hub, 2)[-1]
    assert switched.result.model is not None and switched.result.model.name == "colour"


@pytest.mark.parametrize("raise_errors", [False, True])
def test_camera_loss_shows_no_signal_and_recovers(make_loop: Any, raise_errors: bool) -> None:
    source = FlakySource(raise_errors)
    loop = make_loop(source=source, model=ScriptedModel())
    loop.start()
    collect(loop.hub, 3)
    source.failing.set()
    lost = collect(loop.hub, 5)
    assert all((i.result.error or "").startswith("no signal") for i in lost[1:])
    assert loop.stats.consecutive_failures >= 3
    # The NO SIGNAL frame keeps the display size so viewers see no jump.
    assert lost[-1].image.shape == (180, 320, 3)
    assert source.opens >= 2  # reopened after repeated failures
    source.failing.clear()
    back = collect(loop.hub, 3)
    assert back[-1].result.error is None and back[-1].result.items
    assert loop.stats.consecutive_failures == 0
    assert loop.state is LoopState.RUNNING


def test_source_switch_swaps_on_success(make_loop: Any) -> None:
    loop = make_loop(source=SyntheticSource(160, 90, fps=100), model=ScriptedModel())
    loop._source_factory = default_source_factory
    loop.start()
    collect(loop.hub, 2)
    with pytest.raises(Exception, match="is no file"):
        loop.update({"source": "/no/such/video.mp4"})
    loop.update({"source": "synthetic:200x100@100"})
    time.sleep(0.1)
    assert collect(loop.hub, 2)[-1].image.shape[:2] == (100, 200)


def test_hub_encodes_lazily_and_once_per_resolution(make_loop: Any) -> None:
    loop = make_loop(source=SyntheticSource(320, 180, fps=100), model=ScriptedModel())
    loop.start()
    collect(loop.hub, 5)
    assert loop.hub.total_encodes == 0  # nobody asked: nothing encoded
    loop.pause()
    time.sleep(0.3)
    a = loop.hub.jpeg("480p")
    b = loop.hub.jpeg("480p")
    c = loop.hub.jpeg("native")
    assert a is b and a is not None and c is not None
    assert loop.hub.encodes["480p"] == 1 and loop.hub.encodes["native"] == 1
    assert (a.width, a.height) == (858, 480) and (c.width, c.height) == (320, 180)


def test_large_frames_are_drawn_at_the_display_resolution(make_loop: Any) -> None:
    loop = make_loop(source=SyntheticSource(1920, 1080, fps=100), model=ScriptedModel())
    loop.update({"display_res": "480p"})
    loop.start()
    assert collect(loop.hub, 2)[-1].image.shape == (480, 858, 3)
    loop.update({"display_res": "native"})
    time.sleep(0.05)
    assert collect(loop.hub, 2)[-1].image.shape == (1080, 1920, 3)


def test_a_failed_source_in_the_same_change_keeps_the_old_model(make_loop: Any, tmp_path: Path) -> None:
    loop = make_loop(
        Settings(source="synthetic:160x90@100", model="efficientnet-lite0", display_res="native")
    )
    loop.prepare()
    loop.start()
    collect(loop.hub, 2)
    good = tmp_path / "colour.onnx"
    good.write_bytes(onnx_graphs.classifier())
    with pytest.raises(Exception, match="is no file"):
        loop.update({"model": str(good), "model_type": "classification",
                     "source": "/no/such/clip.mp4"})
    assert loop.settings.model == "efficientnet-lite0"
    assert loop.settings.source == "synthetic:160x90@100"
    after = collect(loop.hub, 2)[-1]
    assert after.result.model is not None and after.result.model.name == "efficientnet-lite0"
