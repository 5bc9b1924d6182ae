"""Event clips: JPEG frames in, an MP4 the browser's own ``<video>`` plays out.

With an ``ffmpeg`` that has libx264 (Debian's and Ubuntu's do), a clip is H.264 in MP4, encoded
by an ffmpeg process at a low priority fed the JPEGs the dashboard already made (no decode or
encode in this process). It is written *fragmented* (``ID.part.mp4``, a keyframe and a fragment
every second), so what was written survives a crash of this process or of ffmpeg, and remuxed
to a regular MP4 with its index first (``ID.mp4``, seekable at once) when the event ends: a copy,
not a re-encode. If this process is killed, ffmpeg still sees its input end and finishes the file.

Without one (a device with no ffmpeg), OpenCV's own FFmpeg writes VP9 in MP4, which browsers play
too, in a thread of this process (decoding each JPEG first, at a higher CPU cost); that file is
only readable once closed, so a crash loses the clip of the event in progress (its snapshots
stay).
"""

from __future__ import annotations

import collections
import logging
import os
import select
import shutil
import subprocess
import threading
from pathlib import Path
from typing import IO, Deque, List, Optional, Tuple, Union

import cv2
import numpy as np

log = logging.getLogger(__name__)

FFMPEG_NICE = 10
CLOSE_SECONDS = 20.0
REMUX_SECONDS = 120.0
# An ffmpeg that takes no frame for this long is given up (a wedged encoder). Only the clip's own
# thread waits that long: an encoder starved of CPU (it runs at a low priority on purpose) may
# pause for seconds on a busy machine and is not wedged.
WRITE_SECONDS = 30.0
BACKLOG_BYTES = 32 * 1024 * 1024  # frames waiting for a slow encoder; beyond this they are dropped
DRAIN_SECONDS = 30.0  # at its end, how long a clip's backlog may take before the rest is dropped


def ffmpeg_path() -> Optional[str]:
    return shutil.which("ffmpeg")


_H264: Optional[bool] = None
_H264_LOCK = threading.Lock()


def ffmpeg_has_h264() -> bool:
    """Whether ``ffmpeg`` is there and can encode H.264 (libx264); asked once per process."""
    global _H264
    with _H264_LOCK:
        if _H264 is None:
            path = ffmpeg_path()
            _H264 = False
            if path:
                try:
                    out = subprocess.run([path, "-hide_banner", "-encoders"], capture_output=True,
                                         text=True, timeout=10).stdout
                    _H264 = " libx264 " in out
                except (OSError, subprocess.SubprocessError):
                    pass
        return _H264


def clip_kind() -> str:
    """``h264`` (ffmpeg with libx264) or ``vp9`` (OpenCV's own writer)."""
    return "h264" if ffmpeg_has_h264() else "vp9"


class ClipError(RuntimeError):
    pass


class FfmpegClip:
    """H.264 in fragmented MP4 by an ffmpeg process reading JPEGs on its stdin."""

    kind = "h264"

    def __init__(self, part: Path, final: Path, fps: float) -> None:
        self.part, self.final, self.fps = part, final, fps
        self.frames = 0
        self._log = part.with_suffix(".log")
        command = [
            "nice", "-n", str(FFMPEG_NICE), ffmpeg_path() or "ffmpeg", "-hide_banner",
            "-loglevel", "error", "-y",
            # start at the first frame, not after probing megabytes of input
            "-probesize", "32768", "-analyzeduration", "0",
            "-f", "image2pipe", "-framerate", f"{fps:g}", "-c:v", "mjpeg", "-i", "pipe:0",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "26", "-pix_fmt", "yuv420p",
            # even sizes for yuv420p; a keyframe (and with it a fragment) every second
            "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2", "-g", str(max(1, int(round(fps)))),
            "-movflags", "+frag_keyframe+empty_moov+default_base_moof", "-flush_packets", "1",
            "-f", "mp4", str(part),
        ]
        self._err: IO[bytes] = open(self._log, "wb")
        self._wedged = False
        try:
            # unbuffered: write() hands each frame to the pipe itself, with a timeout
            self._proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._err,
                close_fds=True, bufsize=0)
        except OSError as exc:
            self._err.close()
            raise ClipError(f"cannot start ffmpeg: {exc}") from None
        assert self._proc.stdin is not None
        os.set_blocking(self._proc.stdin.fileno(), False)

    def write(self, jpeg: bytes) -> None:
        """Hand ``jpeg`` to ffmpeg; ClipError when it stopped, or took nothing for
        WRITE_SECONDS (the recorder must not hang on a wedged encoder)."""
        stdin = self._proc.stdin
        if stdin is None or self._proc.poll() is not None:
            raise ClipError(f"ffmpeg stopped: {self._errors()}")
        fd = stdin.fileno()
        view = memoryview(jpeg)
        try:
            while view:
                _, ready, _ = select.select([], [fd], [], WRITE_SECONDS)
                if not ready:
                    self._wedged = True
                    raise ClipError(f"ffmpeg took no frame for {WRITE_SECONDS:g} s")
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    continue  # taken by the time we wrote: wait for room again
        except (BrokenPipeError, OSError) as exc:
            raise ClipError(f"ffmpeg stopped: {self._errors() or exc}") from None
        self.frames += 1

    def close(self) -> bool:
        """Finish and remux to ``final``; True when it is there."""
        stdin = self._proc.stdin
        if stdin is not None:
            try:
                stdin.close()
            except OSError:
                pass
        try:
            self._proc.wait(CLOSE_SECONDS if not self._wedged else 0.1)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._err.close()
        errors = self._errors()
        if self._proc.returncode != 0:
            log.warning("ffmpeg ended with %s: %s", self._proc.returncode, errors)
        ok = salvage(self.part, self.final)
        if ok:
            _unlink(self._log)
        return ok

    def _errors(self) -> str:
        try:
            return self._log.read_text("utf-8", "replace").strip()[-500:]
        except OSError:
            return ""


class CvClip:
    """VP9 in MP4 by OpenCV's writer, in this process (no ffmpeg executable needed)."""

    kind = "vp9"

    def __init__(self, part: Path, final: Path, fps: float) -> None:
        self.part, self.final, self.fps = part, final, fps
        self.frames = 0
        self._writer: Optional[cv2.VideoWriter] = None
        self._size: Optional[Tuple[int, int]] = None

    def write(self, jpeg: bytes) -> None:
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ClipError("a frame could not be decoded")
        h, w = image.shape[:2]
        if self._writer is None:
            self._size = (w // 2 * 2, h // 2 * 2)
            self._writer = cv2.VideoWriter(str(self.part), cv2.VideoWriter.fourcc(*"vp09"),
                                           self.fps, self._size)
            if not self._writer.isOpened():
                raise ClipError("OpenCV cannot write VP9 in MP4 here")
        if (w, h) != self._size:
            image = cv2.resize(image, self._size)
        self._writer.write(image)
        self.frames += 1

    def close(self) -> bool:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if not self.part.exists():
            return False
        os.replace(str(self.part), str(self.final))
        return True


class QueuedClip:
    """A clip fed by its own named thread, so the recorder never waits for the encoder.

    The recorder's thread also tracks events, writes snapshots and sends notices: were it to wait
    on a slow encoder, events would start and end late. Here :meth:`write` only queues; a backlog
    beyond ``max_bytes`` drops frames (counted), and :meth:`close` lets the encoder finish the
    backlog for up to DRAIN_SECONDS before the rest is dropped. A failed encoder shows at the
    next :meth:`write` as ClipError, as it would unqueued."""

    def __init__(self, clip: Union[FfmpegClip, CvClip], name: str,
                 max_bytes: int = BACKLOG_BYTES) -> None:
        self.clip = clip
        self.kind = clip.kind
        self.dropped = 0
        self._max = max_bytes
        self._queue: Deque[bytes] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._closing = False
        self._error: Optional[str] = None
        self._ok = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def frames(self) -> int:
        return self.clip.frames

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def write(self, jpeg: bytes) -> None:
        with self._cond:
            if self._error is not None:
                raise ClipError(self._error)
            if self._closing:
                return
            if self._bytes + len(jpeg) > self._max:
                if not self.dropped:
                    log.warning("%s: the encoder is %d frames behind; frames are dropped until it "
                                "catches up", self._thread.name, len(self._queue))
                self.dropped += 1
                return
            self._queue.append(jpeg)
            self._bytes += len(jpeg)
            self._cond.notify()

    def close(self) -> bool:
        """Finish the backlog (within DRAIN_SECONDS), then the clip; True when it is there."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(DRAIN_SECONDS)
        if self._thread.is_alive():
            with self._cond:
                if self._queue:
                    log.warning("%s: %d frames were still waiting for the encoder at the end; "
                                "the clip ends without them", self._thread.name, len(self._queue))
                self.dropped += len(self._queue)
                self._queue.clear()
                self._bytes = 0
            # the write in hand, then the clip's own close and remux: each has its own bound
            self._thread.join(WRITE_SECONDS + CLOSE_SECONDS + REMUX_SECONDS)
            if self._thread.is_alive():
                log.error("%s: the clip did not finish", self._thread.name)
                return False
        return self._ok

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if not self._queue:
                        break  # closing, and nothing left
                    jpeg = self._queue.popleft()
                    self._bytes -= len(jpeg)
                try:
                    self.clip.write(jpeg)
                except (ClipError, OSError) as exc:
                    with self._cond:
                        self._error = str(exc)
                        self._queue.clear()
                        self._bytes = 0
                    return
        finally:
            try:
                self._ok = self.clip.close()
            except Exception:
                log.exception("%s: closing the clip failed", self._thread.name)


def open_clip(part: Path, final: Path, fps: float) -> QueuedClip:
    """A queued clip (thread ``clip-ID``, ID from ``part``'s name): H.264 by ffmpeg when it can,
    else VP9 by OpenCV."""
    name = "clip-" + part.name.split(".")[0]
    if ffmpeg_has_h264():
        return QueuedClip(FfmpegClip(part, final, fps), name)
    return QueuedClip(CvClip(part, final, fps), name)


def salvage(part: Path, final: Path) -> bool:
    """Make ``final`` from a fragmented ``part`` (remuxed with its index first when ffmpeg is
    there, else renamed): a clip cut short is playable up to its last fragment."""
    if not part.exists():
        return final.exists()
    path = ffmpeg_path()
    if path:
        tmp = final.with_suffix(".tmp.mp4")
        try:
            done = subprocess.run(
                ["nice", "-n", str(FFMPEG_NICE), path, "-hide_banner", "-loglevel", "error", "-y",
                 "-i", str(part), "-c", "copy", "-movflags", "+faststart", "-f", "mp4", str(tmp)],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=REMUX_SECONDS)
            if done.returncode == 0 and tmp.exists() and tmp.stat().st_size > 0:
                os.replace(str(tmp), str(final))
                _unlink(part)
                return True
            log.warning("cannot remux %s: %s", part, done.stderr.decode("utf-8", "replace")[-300:])
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("cannot remux %s: %s", part, exc)
        _unlink(tmp)
    try:
        os.replace(str(part), str(final))
        return True
    except OSError as exc:
        log.warning("cannot keep the clip %s: %s", part, exc)
        return False


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


__all__: List[str] = ["ClipError", "CvClip", "FfmpegClip", "QueuedClip", "clip_kind",
                      "ffmpeg_has_h264", "open_clip", "salvage"]
