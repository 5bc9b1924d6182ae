"""The frame hub: the one place consumers take the latest frame, its result and its JPEGs from.

The loop publishes and never waits; consumers wait for a newer sequence number and skip what they
missed. A :class:`Frame` is drawn (resized, overlay) when a consumer first asks for its picture,
and encoded once per resolution, when a consumer first asks for that JPEG: a frame nobody watches
costs neither. Encodes happen here only: one at a time per resolution, and one that starts late
(its encoder was busy) encodes the newest frame instead of a stale one, so a lagging encoder
skips ahead and every waiter gets the fresher picture.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import cv2

from inference import RESOLUTION_NAMES, RESOLUTIONS
from inference.result import Result
from inference.types import Image

log = logging.getLogger(__name__)

Listener = Callable[[int], None]
Render = Callable[[Image], Image]


def target_size(width: int, height: int, res: str) -> Tuple[int, int]:
    """Pixel size of a frame of ``width x height`` shown at ``res``.

    A source of (nearly) the same aspect gets the exact DeepLens size; another aspect is fitted
    inside the box so nothing is stretched.
    """
    if res == "native":
        return width, height
    box_w, box_h = RESOLUTIONS[res]
    aspect, box_aspect = width / height, box_w / box_h
    if abs(aspect - box_aspect) / box_aspect < 0.02:
        return box_w, box_h
    scale = min(box_w / width, box_h / height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


class Frame:
    """One published frame: its result, the picture people see and its JPEG per resolution.

    The loop hands over the captured frame and a ``render`` that resizes it and draws the overlay;
    the drawing happens once, for the first consumer that asks for :attr:`image`.
    """

    __slots__ = ("seq", "timestamp", "result", "size", "_raw", "_render", "_image", "_lock",
                 "_jpegs", "_parts", "__weakref__")

    def __init__(self, image: Image, result: Result, render: Optional[Render] = None,
                 size: Optional[Tuple[int, int]] = None) -> None:
        self.seq = result.seq
        self.timestamp = result.timestamp
        self.result = result
        # (width, height) of :attr:`image`, known without rendering it.
        self.size = size or (int(image.shape[1]), int(image.shape[0]))
        self._raw: Image = image
        self._render = render
        self._image: Optional[Image] = image if render is None else None
        self._lock = threading.Lock()
        self._jpegs: Dict[str, bytes] = {}
        self._parts: Dict[str, bytes] = {}

    @property
    def image(self) -> Image:
        """The frame as people see it; never mutated once returned."""
        image = self._image
        if image is not None:
            return image
        with self._lock:
            if self._image is None:
                raw, render = self._raw, self._render
                assert raw is not None and render is not None
                self._image = render(raw)
                self._render = None
            return self._image

    @property
    def raw(self) -> Image:
        """The frame as captured, before resizing and overlay (the recorder's clean snapshot)."""
        return self._raw

    def effective_res(self, res: str) -> str:
        """``res``, or ``native`` when ``res`` would not shrink the frame: an upscale only costs
        CPU and bandwidth, and two names for one size would encode twice."""
        if res == "native":
            return res
        w, h = self.size
        tw, th = target_size(w, h, res)
        return "native" if tw >= w or th >= h else res

    def jpeg(self, res: str) -> Optional[bytes]:
        """This frame's JPEG at ``res`` if it was encoded (:meth:`FrameHub.encode` makes it)."""
        return self._jpegs.get(self.effective_res(res))

    def part(self, res: str) -> bytes:
        """The multipart/x-mixed-replace part of :meth:`jpeg`, built once for every viewer."""
        res = self.effective_res(res)
        part = self._parts.get(res)
        if part is None:
            jpeg = self._jpegs[res]
            head = (f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n"
                    f"X-Frame-Seq: {self.seq}\r\nX-Timestamp: {self.timestamp:.6f}\r\n\r\n")
            part = self._parts[res] = head.encode() + jpeg + b"\r\n"
        return part


class FrameHub:
    def __init__(self, jpeg_quality: int = 80) -> None:
        self.jpeg_quality = jpeg_quality
        self._cond = threading.Condition()
        self._latest: Optional[Frame] = None
        self._closed = False
        self._listeners: List[Listener] = []
        self._encode_locks = {res: threading.Lock() for res in RESOLUTION_NAMES}
        # The newest frame encoded at each resolution, not kept alive for it: a frame nobody
        # holds any more is a frame nobody will ask for.
        self._encoded: Dict[str, Tuple[int, weakref.ReferenceType[Frame]]] = {}
        self.published = 0
        self.encodes = {res: 0 for res in RESOLUTION_NAMES}
        self.encode_seconds = 0.0

    # -- producer side -------------------------------------------------------------------------
    def publish(self, image: Image, result: Result, render: Optional[Render] = None,
                size: Optional[Tuple[int, int]] = None) -> Frame:
        """Publish ``image`` (or, with ``render``, what ``render(image)`` will make of it, of
        ``size``, drawn at the first consumer's request)."""
        frame = Frame(image, result, render, size)
        with self._cond:
            self._latest = frame
            self.published += 1
            self._cond.notify_all()
            listeners = tuple(self._listeners)
        for listener in listeners:
            try:
                listener(frame.seq)
            except Exception:  # a broken consumer must not reach the loop
                log.exception("hub listener failed")
        return frame

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            listeners = tuple(self._listeners)
        for listener in listeners:
            try:
                listener(-1)
            except Exception:
                log.exception("hub listener failed on close")

    def reopen(self) -> None:
        with self._cond:
            self._closed = False

    # -- consumer side -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def latest(self) -> Optional[Frame]:
        return self._latest

    @property
    def seq(self) -> int:
        latest = self._latest
        return latest.seq if latest else 0

    def wait_newer(self, seq: int, timeout: float) -> Optional[Frame]:
        """The latest frame if its seq is above ``seq``, waiting up to ``timeout``; else None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                latest = self._latest
                if latest is not None and latest.seq > seq:
                    return latest
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
        return None

    def add_listener(self, listener: Listener) -> None:
        """``listener(seq)`` runs on the loop thread after each publish: it must only hand off."""
        with self._cond:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def encode(self, res: str, frame: Optional[Frame] = None) -> Optional[Frame]:
        """A frame at least as new as ``frame`` (default: the latest) with its JPEG at ``res``.

        One encode per resolution at a time, always of the newest frame: whoever waited for the
        lock, or asked for a frame already replaced, gets the fresher picture (or the one encoded
        meanwhile) rather than a stale one.
        """
        if res not in self._encode_locks:
            raise ValueError(f"unknown resolution {res!r}")
        frame = frame or self._latest
        if frame is None:
            return None
        res = frame.effective_res(res)
        done = self._done(res, frame.seq)
        if done is not None:
            return done
        with self._encode_locks[res]:
            done = self._done(res, frame.seq)
            if done is not None:
                return done
            latest = self._latest
            if latest is not None and latest.seq > frame.seq and latest.effective_res(res) == res:
                frame = latest
            if res not in frame._jpegs:
                frame._jpegs[res] = self._encode(frame, res)
            self._encoded[res] = (frame.seq, weakref.ref(frame))
            return frame

    def _done(self, res: str, seq: int) -> Optional[Frame]:
        entry = self._encoded.get(res)
        if entry is None or entry[0] < seq:
            return None
        return entry[1]()

    def _encode(self, frame: Frame, res: str) -> bytes:
        image = frame.image  # drawn here if nobody has yet; that time is the loop's stage_ms.overlay
        started = time.perf_counter()
        h, w = image.shape[:2]
        tw, th = target_size(w, h, res)
        if (tw, th) != (w, h):
            image = cv2.resize(image, (tw, th), interpolation=cv2.INTER_LINEAR)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        self.encodes[res] += 1
        self.encode_seconds += time.perf_counter() - started
        return bytes(buf.tobytes())

    @property
    def total_encodes(self) -> int:
        return sum(self.encodes.values())
