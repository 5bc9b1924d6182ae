"""FrameHub: the one place consumers take the latest annotated frame and result from.

The loop publishes and never waits; consumers wait for a newer sequence number and skip what
they missed. A JPEG is made lazily, at most once per frame and resolution, by whichever consumer
asks first; the others get the same bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import cv2

from inference import RESOLUTIONS
from inference.result import Result
from inference.types import Image

log = logging.getLogger(__name__)

Listener = Callable[[int], None]


def target_size(width: int, height: int, res: str) -> tuple[int, int]:
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


Render = Callable[[Image], Image]


class Published:
    """One published frame and its result.

    The loop hands over the captured frame and a ``render`` that resizes it and draws the overlay;
    the drawing happens once, when the first consumer asks for :attr:`image`, so a frame nobody
    watches costs no resize and no drawing.
    """

    __slots__ = ("seq", "timestamp", "result", "size", "_raw", "_render", "_image", "_lock")

    def __init__(self, seq: int, timestamp: float, image: Image, result: Result,
                 render: Render | None = None, size: tuple[int, int] | None = None) -> None:
        self.seq = seq
        self.timestamp = timestamp
        self.result = result
        # (width, height) of :attr:`image`, known without rendering it.
        self.size = size or (int(image.shape[1]), int(image.shape[0]))
        self._raw: Image | None = image
        self._render = render
        self._image: Image | None = image if render is None else None
        self._lock = threading.Lock()

    @property
    def rendered(self) -> bool:
        return self._image is not None

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
                self._raw = self._render = None  # the captured frame is no longer needed
            return self._image


def effective_res(item: Published, res: str) -> str:
    """The cache key for ``res``: a request that would not shrink the frame shares 'native'.

    Upscaling would only cost CPU and bandwidth, and two names for one size would encode twice.
    """
    if res == "native":
        return res
    w, h = item.size
    tw, th = target_size(w, h, res)
    return "native" if tw >= w or th >= h else res


@dataclass(frozen=True)
class Encoded:
    seq: int
    timestamp: float
    res: str
    width: int
    height: int
    jpeg: bytes


class FrameHub:
    def __init__(self, jpeg_quality: int = 80) -> None:
        self.jpeg_quality = jpeg_quality
        self._cond = threading.Condition()
        self._latest: Published | None = None
        self._closed = False
        self._listeners: list[Listener] = []
        self._cache: dict[str, Encoded] = {}
        self._encode_locks: dict[str, threading.Lock] = {r: threading.Lock() for r in RESOLUTIONS}
        self._encode_locks["native"] = threading.Lock()
        self.published = 0
        self.encodes: dict[str, int] = {r: 0 for r in self._encode_locks}
        self.encode_seconds = 0.0

    # -- producer side -------------------------------------------------------------------------
    def publish(self, image: Image, result: Result, render: Render | None = None,
                size: tuple[int, int] | None = None) -> None:
        """Publish ``image`` (or, with ``render``, what ``render(image)`` will make of it, of
        ``size``, drawn at the first consumer's request)."""
        item = Published(result.seq, result.timestamp, image, result, render, size)
        with self._cond:
            self._latest = item
            self.published += 1
            self._cond.notify_all()
            listeners = tuple(self._listeners)
        for listener in listeners:
            try:
                listener(item.seq)
            except Exception:  # a broken consumer must not reach the loop
                log.exception("hub listener failed")

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

    def latest(self) -> Published | None:
        return self._latest

    @property
    def seq(self) -> int:
        latest = self._latest
        return latest.seq if latest else 0

    def wait_newer(self, seq: int, timeout: float) -> Published | None:
        """The latest item if its seq is above ``seq``, waiting up to ``timeout``; else None."""
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

    def jpeg(self, res: str = "native", item: Published | None = None) -> Encoded | None:
        """The JPEG of ``item`` (default: the latest) at ``res``, encoded once and shared."""
        if res not in self._encode_locks:
            raise ValueError(f"unknown resolution {res!r}")
        item = item or self._latest
        if item is None:
            return None
        cached = self._cache.get(res)
        if cached is not None and cached.seq >= item.seq:
            return cached
        with self._encode_locks[res]:
            cached = self._cache.get(res)
            if cached is not None and cached.seq >= item.seq:
                return cached
            encoded = self._encode(item, res)
            self._cache[res] = encoded
            return encoded

    def _encode(self, item: Published, res: str) -> Encoded:
        image = item.image  # drawn here if nobody has yet; that time is the loop's stage_ms.overlay
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
        return Encoded(item.seq, item.timestamp, res, tw, th, buf.tobytes())

    @property
    def total_encodes(self) -> int:
        return sum(self.encodes.values())
