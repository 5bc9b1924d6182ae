"""Frame sources: every kind behind one ``--source`` string."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.sources import SourceSpecError, make_source
from inference.sources.images import ImagesSource
from inference.sources.synthetic import SyntheticSource
from inference.sources.video import VideoSource, demo_clip
from inference.types import FrameSource, SourceError


def test_synthetic_is_deterministic_and_numbered() -> None:
    a = SyntheticSource(320, 180, fps=0)
    b = make_source("synthetic:320x180@0")
    a.open()
    b.open()
    frames_a = [a.read() for _ in range(3)]
    frames_b = [b.read() for _ in range(3)]
    for fa, fb in zip(frames_a, frames_b):
        assert fa is not None and fb is not None
        assert fa.shape == (180, 320, 3) and fa.dtype == np.uint8
        assert np.array_equal(fa, fb)
    assert not np.array_equal(frames_a[0], frames_a[1])  # the pattern moves


@pytest.mark.parametrize(
    ("spec", "size", "fps"),
    [
        ("synthetic", (1280, 720), 30.0),
        ("synthetic@30", (1280, 720), 30.0),
        ("synthetic@12.5", (1280, 720), 12.5),
        ("synthetic:320x240", (320, 240), 30.0),
        ("synthetic:320x240@30", (320, 240), 30.0),
        (" synthetic:64x48@0 ", (64, 48), 0.0),
    ],
)
def test_every_documented_synthetic_spec_works(spec: str, size: tuple[int, int], fps: float) -> None:
    # The README documents synthetic[:WxH][@FPS]: "synthetic@30" once fell through to a path.
    source = make_source(spec)
    assert isinstance(source, SyntheticSource)
    assert (source.width, source.height, source.fps) == (*size, fps)
    source.open()
    frame = source.read()
    assert frame is not None and frame.shape == (size[1], size[0], 3)


@pytest.mark.parametrize("spec", ["synthetic@", "synthetic@fast", "synthetic:320", "synthetic:320x",
                                  "synthetic:8x8", "synthetic:320x240@", "synthetic@30:320x240",
                                  "synthetic:", "synthetic-hd"])
def test_bad_synthetic_specs_are_refused(spec: str) -> None:
    with pytest.raises((SourceSpecError, SourceError), match="synthetic"):
        make_source(spec)


def test_demo_is_the_bundled_bikes_clip() -> None:
    source = make_source("demo", fps=0)
    assert isinstance(source, VideoSource)
    assert demo_clip().name == "bikes.mp4"
    source.open()
    try:
        frame = source.read()
        assert frame is not None and frame.shape == (272, 640, 3)
    finally:
        source.close()


def test_video_file_loops_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "short.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    for i in range(5):
        writer.write(np.full((48, 64, 3), i * 50, np.uint8))
    writer.release()
    source = make_source(str(path), fps=0)
    source.open()
    try:
        means = [float(source.read().mean()) for _ in range(12)]  # type: ignore[union-attr]
    finally:
        source.close()
    assert isinstance(source, VideoSource) and source.loops >= 2
    assert means[0] == pytest.approx(means[5], abs=3)


def test_video_file_is_paced_to_its_own_fps() -> None:
    source = make_source("demo")  # bikes.mp4 is 25 fps
    source.open()
    stamps = []
    try:
        for _ in range(20):
            assert source.read() is not None
            stamps.append(time.monotonic())
    finally:
        source.close()
    gaps = np.diff(stamps)
    # Never faster than the clip (decode alone runs at hundreds of fps here).
    assert statistics.median(gaps) > 0.034


def test_live_source_hands_out_the_newest_frame() -> None:
    # A synthetic pattern written to a file stands for the camera; live=True drops, never queues.
    source = VideoSource(str(demo_clip()), live=True, fps=None)
    source.open()
    try:
        first = source.read()
        time.sleep(0.3)  # the grabber keeps decoding meanwhile
        second = source.read()
        assert first is not None and second is not None
        assert source.frames_read >= 5  # many decoded, only the latest handed out
    finally:
        source.close()


def test_images_folder_skips_non_images(tmp_path: Path, chelsea_bgr: np.ndarray, caplog) -> None:  # type: ignore[no-untyped-def]
    cv2.imwrite(str(tmp_path / "a.png"), chelsea_bgr)
    cv2.imwrite(str(tmp_path / "b.jpg"), np.zeros((20, 30, 3), np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored by extension")
    source = make_source(str(tmp_path), fps=0)
    assert isinstance(source, ImagesSource)
    source.open()
    shapes = [source.read().shape for _ in range(4)]  # type: ignore[union-attr]
    assert shapes == [(300, 451, 3), (20, 30, 3), (300, 451, 3), (20, 30, 3)]
    assert source.skipped == [str(tmp_path / "broken.jpg")]
    assert "broken.jpg" in caplog.text


def test_glob_and_single_image(tmp_path: Path, chelsea_bgr: np.ndarray) -> None:
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), chelsea_bgr)
    src = make_source(str(tmp_path / "f*.png"), fps=0)
    assert isinstance(src, ImagesSource) and len(src.files) == 3
    single = make_source(str(tmp_path / "f0.png"))
    assert isinstance(single, ImagesSource) and single.fps == 5.0


def test_slideshow_moves_on_after_the_interval(tmp_path: Path) -> None:
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((8, 8, 3), i * 200, np.uint8))
    source = ImagesSource(sorted(str(p) for p in tmp_path.iterdir()), fps=50, interval=0.2)
    source.open()
    first = source.read()
    assert first is not None and first.mean() == 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        frame = source.read()
        if frame is not None and frame.mean() == 200:
            break
    else:
        pytest.fail("the slideshow never moved on")


@pytest.mark.parametrize("spec", ["/no/such/file.mp4", "/no/such/dir/*.jpg", "", "bogus-name"])
def test_bad_source_specs_are_refused(spec: str) -> None:
    with pytest.raises(SourceSpecError):
        make_source(spec)


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceSpecError, match="no image"):
        make_source(str(tmp_path))


def test_url_and_webcam_specs_pick_video_capture() -> None:
    assert isinstance(make_source("rtsp://127.0.0.1:1/x"), VideoSource)
    cam = make_source("0")
    assert isinstance(cam, VideoSource) and cam.live and cam.target == 0


def test_every_kind_is_a_frame_source_that_says_when_a_frame_waits(tmp_path: Path) -> None:
    # ready(): a read now would not wait (the loop, not the source, sets the pace).
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    unpaced = [make_source("synthetic:64x48", fps=0), make_source(str(tmp_path), fps=0)]
    for source in [*unpaced, make_source("demo"), make_source("rtsp://127.0.0.1:1/x")]:
        assert isinstance(source, FrameSource), source
    for source in unpaced:
        source.open()
        try:
            assert source.ready() and source.read() is not None and source.ready()
        finally:
            source.close()
    paced = make_source("synthetic:64x48@2")
    paced.open()
    try:
        assert paced.read() is not None
        assert not paced.ready()  # the next frame is half a second away
    finally:
        paced.close()
    demo = make_source("demo", fps=0)
    demo.open()
    try:
        assert demo.read() is not None
        deadline = time.monotonic() + 5
        while not demo.ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert demo.ready()
    finally:
        demo.close()


COLOURS = {"blue.png": (255, 0, 0), "green.png": (0, 255, 0), "red.png": (0, 0, 255)}


def colour_folder(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    for name, bgr in COLOURS.items():
        cv2.imwrite(str(folder / name), np.full((24, 32, 3), bgr, np.uint8))
    return folder


def colour_of(frame: np.ndarray) -> str:
    bgr = tuple(int(v) for v in frame.reshape(-1, 3).mean(axis=0).round())
    return next(name for name, c in COLOURS.items() if c == bgr)


def test_an_image_comes_with_the_file_it_is(tmp_path: Path) -> None:
    source = make_source(str(colour_folder(tmp_path / "imgs")), fps=0)
    assert isinstance(source, ImagesSource)
    source.open()
    got = [source.read_with_origin() for _ in range(4)]
    names = ["blue.png", "green.png", "red.png", "blue.png"]
    for (frame, origin), name in zip(got, names):
        assert frame is not None and origin is not None
        assert origin.name == name == colour_of(frame)
        assert origin.path == str(tmp_path / "imgs" / name) and origin.frame is None
        assert origin.to_json() == {"name": name, "path": origin.path}


def test_a_folder_walked_once_hands_out_each_file_then_ends(tmp_path: Path) -> None:
    folder = colour_folder(tmp_path / "imgs")
    for spec in (str(folder), str(folder / "*.png")):
        source = make_source(spec, interval=3.0, once=True)  # the slideshow's pacing is not used
        assert isinstance(source, ImagesSource)
        source.open()
        started = time.monotonic()
        names = []
        while source.ready():
            frame, origin = source.read_with_origin()
            assert frame is not None and origin is not None and colour_of(frame) == origin.name
            names.append(origin.name)
        assert time.monotonic() - started < 1.0
        assert names == sorted(COLOURS) and not source.ended
        assert source.read_with_origin() == (None, None) and source.ended
        assert source.read() is None
        source.open()  # reopening starts the walk again
        assert not source.ended and source.read() is not None
    # A single image still repeats: infer --frames N runs it N times.
    single = make_source(str(folder / "red.png"), fps=0, once=True)
    single.open()
    assert all(single.read() is not None for _ in range(3))


def test_a_video_file_names_itself_and_the_frame_but_a_camera_does_not(tmp_path: Path) -> None:
    path = tmp_path / "short.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    for i in range(3):
        writer.write(np.full((48, 64, 3), i * 100, np.uint8))
    writer.release()
    source = make_source(str(path), fps=0)
    assert isinstance(source, VideoSource)
    source.open()
    try:
        got = [source.read_with_origin() for _ in range(5)]
    finally:
        source.close()
    assert [o.frame for _, o in got if o is not None] == [0, 1, 2, 0, 1]  # looped
    assert {(o.name, o.path) for _, o in got if o is not None} == {("short.avi", str(path))}
    demo = make_source("demo", fps=0)
    demo.open()
    try:
        frame, origin = demo.read_with_origin()  # type: ignore[attr-defined]
    finally:
        demo.close()
    assert frame is not None and origin is not None and origin.name == "bikes.mp4"
    live = VideoSource(str(path), live=True)  # stands for a camera: no file to name
    live.open()
    try:
        frame, origin = live.read_with_origin()
    finally:
        live.close()
    assert frame is not None and origin is None
