"""What may be a source (issue 16.5) and a source that blocks on open (issue 16.6).

Sources are limited to what decodes as video or images: a text file (FFmpeg's tty demuxer would
render it into /snapshot.jpg, which views get without a token), a playlist, a FIFO or a device
other than a camera is refused, live (422 naming ``source``) and at start (exit 2 naming
``--source``); network sources by scheme (``--source-schemes``). A source that would block on
open (a FIFO with no writer) answers at once, and a stream that never answers is given up after
the open timeout, shown in /health meanwhile. Real files, real FIFOs, real ffmpeg, OpenCV, CLI
subprocesses and uvicorn.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from inference.sources import SourceSpecError, make_source
from inference.sources.images import ImagesSource
from inference.sources.video import VideoSource, demo_clip
from inference.types import SourceError
from tests.conftest import ROOT, free_port, require_tool
from tests.test_server import TOKEN, running_server

KEY_TEXT = "-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBF0secretsecretsecret\n=abcd\n"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPLENS_")}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def _clip(path: Path, frames: int = 4) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    for i in range(frames):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    return path


def _unblock(fifo: Path) -> None:
    """Let a reader stuck opening ``fifo`` go: a writer that opens and closes (EOF)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # nobody is waiting on it


# -- point 5: what decodes as video or images, nothing else ---------------------------------------
def test_a_text_file_is_refused_live_and_nothing_of_it_reaches_the_snapshot(tmp_path: Path) -> None:
    key = tmp_path / "key.asc"
    key.write_text(KEY_TEXT)
    with running_server() as srv, srv.client(TOKEN) as client:
        srv.wait_frames(1)
        response = client.patch("/api/config", json={"source": str(key)})
        assert response.status_code == 422, response.text
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", "source"] and "key.asc" in error["msg"], error
        assert "video" in error["msg"], error
        assert client.get("/api/config").json()["source"] == "synthetic:640x360@30"
        seq = srv.wait_frames(2)
        result = client.get("/results").json()
        assert result["seq"] >= seq and result["error"] is None


def test_a_text_file_is_refused_at_start(tmp_path: Path) -> None:
    key = tmp_path / "key.asc"
    key.write_text(KEY_TEXT)
    proc = cli("infer", "--frames", "1", "--source", str(key))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "error: --source" in proc.stderr and "key.asc" in proc.stderr, proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(("name", "content"), [
    ("notes.txt", "plain text\n" * 20),
    ("key.mp4", KEY_TEXT),  # a video's name, a text's bytes
    ("list.m3u8", "#EXTM3U\n#EXTINF:1,\n/etc/hostname\n"),  # a playlist names other files
    ("list.ffconcat", "ffconcat version 1.0\nfile '/etc/hostname'\n"),
    ("session.sdp", "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nm=video 9 RTP/AVP 96\n"),
    ("empty.avi", ""),
])
def test_text_playlists_and_empty_files_are_refused(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises((SourceSpecError, SourceError), match=name):
        source = make_source(str(path))
        source.open()  # before the fix, FFmpeg opened most of these
        source.close()


CONTAINERS = {  # a file name, then ffmpeg's output options for it
    "clip.mp4": ["-c:v", "mpeg4"], "clip.mkv": ["-c:v", "mpeg4"], "clip.avi": ["-c:v", "mjpeg"],
    "clip.mov": ["-c:v", "mjpeg"], "clip.ts": ["-c:v", "mpeg2video"], "clip.mpg": ["-c:v", "mpeg1video"],
    "clip.flv": ["-c:v", "flv"], "clip.webm": ["-c:v", "libvpx"], "clip.ogv": ["-c:v", "libtheora"],
    "clip.y4m": [], "clip.gif": [], "clip.mjpeg": ["-f", "mjpeg"], "clip.h264": ["-c:v", "libx264"],
    "clip.wmv": ["-c:v", "wmv2"], "clip.ivf": ["-c:v", "libvpx"], "clip.3gp": ["-c:v", "h263"],
}


def test_video_containers_still_play(tmp_path: Path) -> None:
    """The check keeps every container FFmpeg writes that a camera or a user would have."""
    ffmpeg = require_tool("ffmpeg")
    encoders = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True,
                              timeout=30).stdout
    played = []
    for name, options in CONTAINERS.items():
        codec = options[options.index("-c:v") + 1] if "-c:v" in options else ""
        if codec and f" {codec} " not in encoders:
            continue  # this ffmpeg cannot write it
        path = tmp_path / name
        subprocess.run([ffmpeg, "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                        "testsrc=size=176x144:rate=25:duration=0.4", *options, "-pix_fmt", "yuv420p"
                        if name != "clip.gif" else "rgb8", str(path)], check=True, timeout=60)
        source = make_source(str(path), fps=0)
        assert isinstance(source, VideoSource), name
        source.open()
        try:
            frame = source.read()
        finally:
            source.close()
        assert frame is not None and frame.shape[2] == 3, name
        played.append(name)
    print(f"\nplayed: {' '.join(played)}")
    assert len(played) >= 10, played
    source = make_source(str(demo_clip()), fps=0)
    source.open()
    source.close()


def test_network_sources_are_limited_by_scheme() -> None:
    for url in ("tcp://127.0.0.1:9", "udp://127.0.0.1:9", "rtmp://127.0.0.1/x", "ftp://127.0.0.1/x",
                "file:///etc/hostname", "gopher://127.0.0.1/x", "concat:/etc/hostname|/etc/hostname",
                "subfile,,start,0,end,10,,:/etc/hostname"):
        with pytest.raises(SourceSpecError):
            make_source(url)
    for url in ("rtsp://127.0.0.1:9/x", "rtsps://127.0.0.1:9/x", "http://127.0.0.1:9/x",
                "HTTPS://127.0.0.1:9/x"):
        source = make_source(url)
        assert isinstance(source, VideoSource) and source.live
    assert isinstance(make_source("tcp://127.0.0.1:9", schemes=("tcp",)), VideoSource)
    with pytest.raises(SourceSpecError, match="--source-schemes"):
        make_source("http://127.0.0.1:9/x", schemes=("rtsp", "https"))


def test_a_scheme_not_allowed_is_refused_live_and_at_start() -> None:
    with running_server() as srv, srv.client(TOKEN) as client:
        srv.wait_frames(1)
        for url in ("tcp://127.0.0.1:9", "udp://127.0.0.1:9"):
            response = client.patch("/api/config", json={"source": url})
            assert response.status_code == 422, response.text
            [error] = response.json()["detail"]
            assert error["loc"] == ["body", "source"] and "scheme" in error["msg"], error
        # The allowed schemes are the owner's, not a live setting a token holder may widen.
        response = client.patch("/api/config", json={"source_schemes": "tcp"})
        assert response.status_code == 422, response.text
    proc = cli("infer", "--frames", "1", "--source", "udp://127.0.0.1:9")
    assert proc.returncode == 2 and "error: --source" in proc.stderr, proc.stderr[-2000:]
    proc = cli("infer", "--frames", "1", "--source-schemes", "rtsp,https", "--source",
               "http://127.0.0.1:9/x")
    assert proc.returncode == 2 and "error: --source" in proc.stderr, proc.stderr[-2000:]
    proc = cli("infer", "--frames", "1", "--source-schemes", "rtsp,gopher")
    assert proc.returncode == 2 and "error: --source-schemes" in proc.stderr, proc.stderr[-2000:]


def test_fifos_sockets_and_devices_are_refused_and_an_image_folder_skips_them(
    tmp_path: Path, chelsea_bgr: np.ndarray
) -> None:
    fifo = tmp_path / "x.mp4"
    os.mkfifo(fifo)
    image_fifo = tmp_path / "x.jpg"
    os.mkfifo(image_fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "x.avi"))
    try:
        for path in (str(fifo), str(image_fifo), str(tmp_path / "x.avi"), "/dev/null", "/dev/zero"):
            with pytest.raises(SourceSpecError, match="regular file|camera"):
                make_source(path)
    finally:
        sock.close()
    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "b.png"), chelsea_bgr)
    os.mkfifo(folder / "a.jpg")  # first in the walk: imread would wait for a writer forever
    source = make_source(str(folder), fps=0)
    assert isinstance(source, ImagesSource)
    opened = threading.Thread(target=source.open, name="test-open-images", daemon=True)
    opened.start()
    opened.join(10)
    if opened.is_alive():
        _unblock(folder / "a.jpg")
        opened.join(10)
        pytest.fail("opening a folder with a FIFO in it blocked")
    assert source.skipped == [str(folder / "a.jpg")]
    frame = source.read()
    assert frame is not None and frame.shape == chelsea_bgr.shape


# -- point 6: nothing blocks the control on open ---------------------------------------------------
def test_a_fifo_source_answers_at_once_and_later_changes_go_through(tmp_path: Path) -> None:
    fifo = tmp_path / "camera.mp4"
    os.mkfifo(fifo)  # no writer, ever: FFmpeg's open would wait for one
    with running_server() as srv, srv.client(TOKEN) as client:
        srv.wait_frames(1)
        started = time.monotonic()
        try:
            response = client.patch("/api/config", json={"source": str(fifo)}, timeout=10.0)
        except httpx.TimeoutException:
            took = time.monotonic() - started
            _unblock(fifo)  # so the test's server can stop
            pytest.fail(f"PATCH to a FIFO source did not answer in {took:.1f} s")
        took = time.monotonic() - started
        print(f"\nPATCH source=FIFO answered {response.status_code} in {took * 1000:.0f} ms")
        assert response.status_code == 422, response.text
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", "source"] and "regular file" in error["msg"], error
        other = client.patch("/api/config", json={"threshold": 0.3}, timeout=10.0)
        assert other.status_code == 200, other.text
        srv.wait_frames(2)


def test_a_fifo_source_at_start_exits_2_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "camera.mp4"
    os.mkfifo(fifo)
    started = time.monotonic()
    try:
        proc = cli("infer", "--frames", "1", "--source", str(fifo), timeout=30)
    except subprocess.TimeoutExpired:  # run() killed it
        pytest.fail("the CLI hung opening a FIFO source (killed after 30 s)")
    print(f"\nCLI --source FIFO exited {proc.returncode} in {time.monotonic() - started:.1f} s")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --source" in proc.stderr and "regular file" in proc.stderr, proc.stderr


class SilentServer:
    """A TCP server that accepts and never says a word: a stream stalled before its headers."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-silent-server", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.accepted.append(conn)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()
        self.listener.close()


@contextmanager
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.stop()


def test_a_stream_that_never_answers_is_given_up_after_the_open_timeout() -> None:
    with silent_server() as silent:
        source = VideoSource(f"http://127.0.0.1:{silent.port}/stream.mjpg", live=True)
        errors: list[Exception] = []

        def open_it() -> None:
            try:
                source.open()
            except Exception as exc:
                errors.append(exc)

        started = time.monotonic()
        opener = threading.Thread(target=open_it, name="test-open-stream", daemon=True)
        opener.start()
        opener.join(25)  # OpenCV's own FFmpeg default is 30 s
        took = time.monotonic() - started
        print(f"\nopening a stream that never answers gave up after {took:.1f} s")
        assert not opener.is_alive(), "the open was still waiting after 25 s"
    source.close()
    assert errors and isinstance(errors[0], SourceError), errors


def test_health_says_the_source_is_opening_while_the_loop_waits_on_it() -> None:
    with silent_server() as silent:
        url = f"http://127.0.0.1:{silent.port}/stream.mjpg"
        with running_server(source=url) as srv, srv.client() as client:
            deadline = time.monotonic() + 15
            health: dict[str, Any] = {}
            while time.monotonic() < deadline:
                health = client.get("/health").json()
                if any(r.startswith("source: opening") for r in health["reasons"]):
                    break
                time.sleep(0.2)
            else:
                silent.stop()
                pytest.fail(f"/health never said the source was opening: {health}")
            assert health["status"] == "degraded"
            reason = next(r for r in health["reasons"] if r.startswith("source: opening"))
            assert url in reason and reason.endswith(" s"), reason
            silent.stop()  # the stream goes away: the open ends


def test_a_webcam_index_and_free_port_url_still_build() -> None:
    assert isinstance(make_source("0"), VideoSource)
    assert isinstance(make_source(f"rtsp://127.0.0.1:{free_port()}/live"), VideoSource)
