"""The project-stream FIFO: real ffmpeg and mplayer read it; readers come and go; no reader costs
the loop nothing; a regular file at the path is refused and left alone."""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from inference.models.parse import CutsAfterParsing
from inference.outputs import OutputError, build_outputs
from inference.outputs.fifo import FifoWriter
from inference.pipeline.frames import FrameHub
from inference.result import Item, Result
from inference.service import Service
from inference.settings import Settings
from inference.sources.synthetic import SyntheticSource
from inference.types import Image, ModelInfo
from tests.conftest import require_tool

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
POLL = 0.05  # the writer's reader polling in these tests (4 Hz in the product)
STOP_SECONDS = 2.0


def stop(worker: Any, seconds: float = STOP_SECONDS) -> bool:
    """Stop an output (or any worker) by an absolute deadline ``seconds`` from now."""
    return bool(worker.stop(time.monotonic() + seconds))


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout``: a bounded wait, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def split_jpegs(data: bytes) -> tuple[list[bytes], bytes]:
    """Whole JPEGs (SOI..EOI) from the start of ``data`` and the unfinished rest. cv2 writes no
    EXIF thumbnail and entropy-coded data stuffs 0xFF, so EOI appears only at a JPEG's end."""
    frames = []
    while True:
        end = data.find(EOI)
        if end < 0:
            return frames, data
        frames.append(data[: end + 2])
        data = data[end + 2 :]


def read_fifo(path: Path, frames: int, timeout: float = 20.0) -> tuple[list[bytes], bytes]:
    """Open the FIFO as a reader (non-blocking, so a broken writer cannot hang the test) and
    read until ``frames`` whole JPEGs arrived or ``timeout``; returns the JPEGs and the raw bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    raw = bytearray()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                time.sleep(0.02)  # no writer (yet, or any more): EOF until one opens
                continue
            raw += chunk
            if len(split_jpegs(bytes(raw))[0]) >= frames:
                break
    finally:
        os.close(fd)
    return split_jpegs(bytes(raw))[0][:frames], bytes(raw)


def decode(jpeg: bytes) -> Image:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a decodable JPEG"
    return image


class Feeder:
    """Publishes numbered frames into a hub at ~30 fps from a named, stoppable thread."""

    def __init__(self, hub: FrameHub, size: tuple[int, int] = (1280, 720), fps: float = 30.0) -> None:
        self.hub = hub
        self.size = size
        self.interval = 1.0 / fps
        self.stop_event = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, name="test-feeder", daemon=True)

    def _run(self) -> None:
        w, h = self.size
        while not self.stop_event.wait(self.interval):
            self.count += 1
            image = np.full((h, w, 3), (self.count * 7) % 256, np.uint8)
            cv2.putText(image, str(self.count), (20, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 2,
                        (255, 255, 255), 3)
            self.hub.publish(image, Result(self.count, time.time(), None, (w, h)))

    def __enter__(self) -> Feeder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(5)


@pytest.fixture
def hub() -> FrameHub:
    return FrameHub(jpeg_quality=80)


@pytest.fixture
def fifo_path(tmp_path: Path) -> Path:
    return tmp_path / "results.mjpeg"


@pytest.fixture
def writer(fifo_path: Path, hub: FrameHub) -> Iterator[FifoWriter]:
    w = FifoWriter(str(fifo_path), hub, "480p", poll_interval=POLL)
    w.start()
    try:
        yield w
    finally:
        stop(w)


@pytest.fixture
def feeding(hub: FrameHub) -> Iterator[Feeder]:
    with Feeder(hub) as feeder:
        yield feeder


def run_reader(cmd: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # run() has killed it
        pytest.fail(f"{cmd[0]} did not finish in {timeout} s: {exc.stderr!r}")


@pytest.mark.device
def test_ffmpeg_reads_decodable_frames(writer: FifoWriter, feeding: Feeder, fifo_path: Path,
                                       tmp_path: Path) -> None:
    ffmpeg = require_tool("ffmpeg")
    out = tmp_path / "ff"
    out.mkdir()
    proc = run_reader([ffmpeg, "-nostdin", "-loglevel", "error", "-f", "mjpeg", "-i", str(fifo_path),
                       "-frames:v", "5", str(out / "out%d.jpg")])
    assert proc.returncode == 0, proc.stderr
    files = sorted(out.glob("out*.jpg"))
    assert len(files) == 5
    for f in files:
        image = cv2.imread(str(f))
        assert image is not None and image.shape == (480, 858, 3)
    assert writer.stats()["frames_written"] >= 5


def test_mplayer_reads_decodable_frames(writer: FifoWriter, feeding: Feeder, fifo_path: Path,
                                        tmp_path: Path) -> None:
    mplayer = require_tool("mplayer")
    out = tmp_path / "mp"
    out.mkdir()
    proc = run_reader([mplayer, "-really-quiet", "-noconsolecontrols", "-demuxer", "lavf",
                       "-lavfdopts", "format=mjpeg:probesize=32", "-vo", f"jpeg:outdir={out}",
                       "-nosound", "-frames", "5", str(fifo_path)])
    assert proc.returncode == 0, proc.stderr
    files = sorted(out.glob("*.jpg"))
    assert len(files) == 5, (proc.stdout, proc.stderr)
    for f in files:
        image = cv2.imread(str(f))
        assert image is not None and image.shape[:2] == (480, 858)


def test_reader_comes_goes_and_comes_back(writer: FifoWriter, feeding: Feeder,
                                          fifo_path: Path) -> None:
    first, _ = read_fifo(fifo_path, 3)
    assert len(first) == 3
    # The writer notices the reader left (EPIPE on a write, or POLLERR while idle) and waits.
    assert wait_for(lambda: not writer.stats()["reader"])
    assert writer.health()[0]
    second, raw = read_fifo(fifo_path, 3)
    assert len(second) == 3
    assert raw.startswith(SOI), "a new reader starts on a frame boundary"
    for jpeg in first + second:
        assert decode(jpeg).shape == (480, 858, 3)
    assert writer.stats()["readers"] >= 2


def test_each_frame_is_written_once(writer: FifoWriter, hub: FrameHub, fifo_path: Path) -> None:
    """The seed rewrote the same JPEG in a busy loop; here a still hub means a silent pipe."""
    image = np.zeros((720, 1280, 3), np.uint8)
    hub.publish(image, Result(1, time.time(), None, (1280, 720)))
    fd = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert wait_for(lambda: writer.stats()["frames_written"] == 1)
        data = b""
        deadline = time.monotonic() + 5
        while EOI not in data and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                data += os.read(fd, 1 << 20)
        frames, rest = split_jpegs(data)
        assert len(frames) == 1 and rest == b""
        # Several of the writer's idle wake-ups pass with nothing new: nothing more is written.
        time.sleep(POLL * 6)
        assert writer.stats()["frames_written"] == 1
        assert not select.select([fd], [], [], 0)[0]
        assert hub.encodes["480p"] == 1
    finally:
        os.close(fd)


def test_stuck_reader_drops_frames_and_keeps_the_stream_whole(
    writer: FifoWriter, feeding: Feeder, fifo_path: Path
) -> None:
    fd = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        # The reader reads nothing: the pipe fills, then frames are dropped, not queued.
        assert wait_for(lambda: writer.stats()["frames_dropped"] >= 5, timeout=20)
        published = feeding.count
        assert wait_for(lambda: feeding.count >= published + 10), "the producer kept going"
        # The reader wakes up: what it finds starts on a frame and holds only whole frames.
        raw = bytearray()
        while len(split_jpegs(bytes(raw))[0]) < 5 and select.select([fd], [], [], 5.0)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            raw += chunk
    finally:
        os.close(fd)
    frames, _ = split_jpegs(bytes(raw))
    assert raw.startswith(SOI)
    assert len(frames) >= 2
    for jpeg in frames:
        assert jpeg.startswith(SOI) and jpeg.count(SOI) == 1, "no half JPEG before a new one"
        assert decode(jpeg).shape == (480, 858, 3)


def test_partial_writes_are_finished_before_the_next_frame(
    monkeypatch: pytest.MonkeyPatch, fifo_path: Path, hub: FrameHub, feeding: Feeder
) -> None:
    """A one-page pipe and no backlog check: every frame goes in pieces, and still each
    JPEG is whole and followed by the next one's start."""
    from inference.outputs import fifo

    monkeypatch.setattr(fifo, "PIPE_SIZE", 4096)
    monkeypatch.setattr(fifo, "_unread_bytes", lambda fd: None)
    w = FifoWriter(str(fifo_path), hub, "480p", poll_interval=POLL)
    w.start()
    try:
        frames, raw = read_fifo(fifo_path, 6)
    finally:
        stop(w)
    assert w.stats()["partial_writes"] >= 6
    assert raw.startswith(SOI) and len(frames) == 6
    for jpeg in frames:
        assert jpeg.count(SOI) == 1
        assert decode(jpeg).shape == (480, 858, 3)


def test_resolution_changes_live(writer: FifoWriter, feeding: Feeder, fifo_path: Path) -> None:
    writer.apply(Settings(fifo_res="720p"))
    frames, _ = read_fifo(fifo_path, 2)
    assert [decode(f).shape for f in frames] == [(720, 1280, 3)] * 2


def test_a_source_smaller_than_fifo_res_is_written_at_its_own_size(
    writer: FifoWriter, hub: FrameHub, fifo_path: Path
) -> None:
    """An upscale would cost a resize and a second encode per frame for no detail: the FIFO gets
    the frame as it is, the same bytes a viewer gets (one encode for both)."""
    with Feeder(hub, size=(640, 272)):
        frames, _ = read_fifo(fifo_path, 3)
        assert [decode(f).shape for f in frames] == [(272, 640, 3)] * 3
        viewer = hub.encode("native")
        assert viewer is not None and viewer.jpeg("native") is not None
    assert hub.encodes["480p"] == 0 and hub.encodes["native"] >= 3


def test_regular_file_is_refused_and_left_intact(fifo_path: Path, hub: FrameHub) -> None:
    fifo_path.write_bytes(b"precious data")
    with pytest.raises(OutputError) as info:
        FifoWriter(str(fifo_path), hub)
    assert str(fifo_path) in str(info.value) and info.value.option == "--fifo"
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="--fifo"):
        build_outputs(Settings(fifo=str(fifo_path), iot="off"), hub)
    assert fifo_path.read_bytes() == b"precious data"


def test_fifo_is_made_when_missing_and_off_means_none(fifo_path: Path, hub: FrameHub) -> None:
    import stat

    outputs = build_outputs(Settings(fifo=str(fifo_path), iot="off"), hub)
    assert [o.name for o in outputs] == ["fifo"]
    outputs[0].start()
    try:
        assert stat.S_ISFIFO(os.stat(fifo_path).st_mode)
    finally:
        stop(outputs[0])
    assert build_outputs(Settings(fifo="off", iot="off"), hub) == []


def test_path_replaced_by_a_file_while_running(writer: FifoWriter, feeding: Feeder,
                                               fifo_path: Path) -> None:
    frames, _ = read_fifo(fifo_path, 2)
    assert len(frames) == 2
    fifo_path.unlink()
    fifo_path.write_bytes(b"someone else's file")
    assert wait_for(lambda: not writer.health()[0])
    ok, reason = writer.health()
    assert "not a FIFO" in reason and str(fifo_path) in reason
    written = writer.stats()["frames_written"]
    time.sleep(POLL * 6)
    assert fifo_path.read_bytes() == b"someone else's file"
    assert writer.stats()["frames_written"] == written


def test_stop_with_a_reader_attached_closes_the_pipe(writer: FifoWriter, feeding: Feeder,
                                                     fifo_path: Path) -> None:
    fd = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert wait_for(lambda: writer.stats()["reader"])
        assert stop(writer)
        assert not any(t.name == "fifo-writer" and t.is_alive() for t in threading.enumerate())
        # With the writer gone the reader sees EOF once the pipe is drained.
        data = b"x"
        while data:
            select.select([fd], [], [], 1.0)
            data = os.read(fd, 1 << 20)
    finally:
        os.close(fd)


class _StubModel(CutsAfterParsing):
    def __init__(self) -> None:
        self.info = ModelInfo("stub", "classification", 8, 8, "test", {0: "dog", 1: "cat"})

    def preprocess(self, frame: Image) -> Any:
        return frame

    def infer(self, inputs: Any) -> dict[str, Any]:
        return {"p": np.array([0.25, 0.75], np.float32)}

    def parse(self, raw: dict[str, Any]) -> dict[str, Any]:
        from inference.models import parse

        return parse.classification(raw["p"])

    def close(self) -> None:
        pass


def _frames_in(hub: FrameHub, seconds: float) -> int:
    start = hub.published
    time.sleep(seconds)
    return hub.published - start


def test_no_reader_costs_the_loop_nothing(fifo_path: Path) -> None:
    settings = Settings(source="synthetic", display_res="480p")
    service = Service(settings, lambda s: SyntheticSource(640, 360, fps=0), lambda s: _StubModel())
    hub = service.hub
    service.prepare()
    service.start()
    writer = FifoWriter(str(fifo_path), hub, "480p")
    try:
        assert wait_for(lambda: hub.published > 10)
        without = _frames_in(hub, 1.0)
        writer.start()
        with_writer = _frames_in(hub, 1.0)
        assert with_writer > 0.5 * without, (without, with_writer)
        # No reader: no JPEG is ever made and the writer only polls for one.
        assert hub.total_encodes == 0
        stats = writer.stats()
        assert stats["frames_written"] == 0 and stats["state"] == "waiting for a reader"
    finally:
        stop(writer)
        service.stop()


def test_a_new_reader_gets_the_latest_frame_at_once(fifo_path: Path, hub: FrameHub) -> None:
    """A frame published before anyone reads (a paused loop) still reaches the next reader."""
    w = FifoWriter(str(fifo_path), hub, "480p", poll_interval=POLL)
    image = np.zeros((480, 858, 3), np.uint8)
    result = Result(1, time.time(), None, (858, 480), items=(Item(1, "cat", 0.9),))
    hub.publish(image, result)
    w.start()
    try:
        frames, _ = read_fifo(fifo_path, 1)
        assert decode(frames[0]).shape == (480, 858, 3)
    finally:
        stop(w)


def test_a_reader_that_never_reads_is_degraded_health_until_it_reads(
    fifo_path: Path, hub: FrameHub, feeding: Feeder
) -> None:
    writer = FifoWriter(str(fifo_path), hub, "480p", poll_interval=POLL, stuck_after=1.0)
    writer.start()
    fd = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)  # a reader that opens and never reads
    try:
        assert wait_for(lambda: writer.stats()["reader"])
        assert writer.health()[0]
        assert wait_for(lambda: not writer.health()[0], timeout=20), writer.stats()
        ok, reason = writer.health()
        assert str(fifo_path) in reason and "reader attached but took no frame for" in reason, reason
        # It reads again: healthy again as soon as whole frames get through.
        deadline = time.monotonic() + 20
        while not writer.health()[0] and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                os.read(fd, 1 << 20)
        assert writer.health()[0], writer.health()
    finally:
        os.close(fd)
        stop(writer)


def test_the_fifo_made_is_removed_at_stop_and_one_found_is_left(fifo_path: Path, hub: FrameHub) -> None:
    writer = FifoWriter(str(fifo_path), hub, poll_interval=POLL)
    writer.start()
    assert fifo_path.exists()
    stop(writer)
    assert not fifo_path.exists(), "the FIFO this run made is removed at a clean stop"
    assert not Path(str(fifo_path) + ".lock").exists()
    os.mkfifo(fifo_path)  # someone else's (a service file, a user's): left as found
    writer = FifoWriter(str(fifo_path), hub, poll_interval=POLL)
    writer.start()
    stop(writer)
    assert fifo_path.exists()


_SECOND_WRITER = """
import sys, time
from inference.outputs.fifo import FifoWriter
from inference.pipeline.frames import FrameHub
writer = FifoWriter(sys.argv[1], FrameHub(), poll_interval=0.05)
writer.start()
print("started", flush=True)
sys.stdin.readline()
writer.stop(time.monotonic() + 2)
"""


def test_a_second_dashboard_on_the_same_fifo_warns_and_waits_its_turn(
    fifo_path: Path, hub: FrameHub, caplog: pytest.LogCaptureFixture
) -> None:
    import sys

    from tests.conftest import product_pythonpath

    first = subprocess.Popen([sys.executable, "-c", _SECOND_WRITER, str(fifo_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": product_pythonpath()})
    second = FifoWriter(str(fifo_path), hub, poll_interval=POLL)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "started"
        second.start()
        ok, reason = second.health()
        assert not ok and f"another dashboard (pid {first.pid}) writes to {fifo_path}" in reason, reason
        assert any(r.levelname == "WARNING" and "another dashboard" in r.getMessage()
                   for r in caplog.records), caplog.text
        with Feeder(hub):
            time.sleep(POLL * 6)
            assert second.stats()["frames_written"] == 0 and second.stats()["open_attempts"] == 0
            # The first one exits (removing the FIFO it made): the second takes over.
            assert first.stdin is not None
            first.stdin.write("\n")
            first.stdin.flush()
            assert first.wait(10) == 0
            assert wait_for(lambda: second.health()[0]), second.health()
            assert wait_for(fifo_path.exists)
            frames, _ = read_fifo(fifo_path, 2)
            assert len(frames) == 2
    finally:
        stop(second)
        if first.poll() is None:
            first.kill()
            first.wait(10)
    assert not fifo_path.exists()


def test_health_clears_when_the_fault_clears_without_a_reader(writer: FifoWriter, feeding: Feeder,
                                                               fifo_path: Path) -> None:
    """Issue 16.8: the file put in the FIFO's place is removed: the writer makes its FIFO again
    and /health is ok at once, before any reader comes."""
    fifo_path.unlink()
    fifo_path.write_bytes(b"someone else's file")
    assert wait_for(lambda: not writer.health()[0])
    fifo_path.unlink()
    assert wait_for(lambda: writer.health()[0], timeout=10), writer.health()
    assert writer.stats()["state"] == "waiting for a reader" and writer.stats()["problem"] is None
    import stat

    assert stat.S_ISFIFO(os.stat(fifo_path).st_mode)
    frames, _ = read_fifo(fifo_path, 2)
    assert len(frames) == 2


def test_a_full_filesystem_is_named_as_such_and_clears_when_space_is_back(
    tmp_path: Path, hub: FrameHub, feeding: Feeder
) -> None:
    """Issue 16.8: the FIFO removed (a tmp cleaner) on a filesystem with no inode left: /health
    says "No space left on device", not "not a FIFO", and clears once an inode is free."""
    from tests.test_values import fill, small_tmpfs

    with small_tmpfs(tmp_path / "mnt", inodes=64) as mnt:
        path = mnt / "results.mjpeg"
        writer = FifoWriter(str(path), hub, "480p", poll_interval=POLL)
        writer.start()
        try:
            assert path.exists() and writer.health()[0]
            path.unlink()
            made = fill(mnt, inodes=True)
            assert wait_for(lambda: not writer.health()[0], timeout=10), writer.health()
            ok, reason = writer.health()
            assert "No space left on device" in reason and str(path) in reason, reason
            assert "not a FIFO" not in reason and "not a FIFO" not in writer.stats()["state"]
            made[-1].unlink()  # an inode free again
            assert wait_for(lambda: writer.health()[0], timeout=10), writer.health()
            assert path.exists()
        finally:
            stop(writer)
