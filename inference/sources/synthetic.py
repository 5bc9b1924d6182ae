"""A deterministic moving pattern with the frame number drawn in: for tests and benchmarks."""

from __future__ import annotations

import re
import threading

import cv2
import numpy as np

from inference.sources.pacing import Pacer
from inference.types import Image, SourceError

_SPEC = re.compile(r"^synthetic(?::(\d+)x(\d+))?(?:@(\d+(?:\.\d+)?))?$")


class SyntheticSource:
    """``synthetic[:WxH][@FPS]``; default 1280x720 at 30 fps. Frame ``n`` is always the same image."""

    def __init__(self, width: int = 1280, height: int = 720, fps: float = 30.0) -> None:
        if not (16 <= width <= 7680 and 16 <= height <= 4320):
            raise SourceError(f"synthetic size {width}x{height} is out of range (16..7680 x 16..4320)")
        self.width, self.height, self.fps = width, height, fps
        self.name = f"synthetic:{width}x{height}@{fps:g}"
        self.frame_number = 0
        self._pacer = Pacer(fps)
        self._stop = threading.Event()
        # Drawing a gradient per frame would cost more than the model; draw it once.
        xs = np.linspace(0, 255, width, dtype=np.float32)
        ys = np.linspace(0, 255, height, dtype=np.float32)
        self._background = np.dstack(
            [
                np.broadcast_to(xs, (height, width)),
                np.broadcast_to(ys[:, None], (height, width)),
                np.full((height, width), 96, np.float32),
            ]
        ).astype(np.uint8)

    @classmethod
    def from_spec(cls, spec: str, fps: float | None = None) -> SyntheticSource:
        match = _SPEC.match(spec)
        if not match:
            raise SourceError(f"bad synthetic source {spec!r}: use synthetic[:WxH][@FPS]")
        width = int(match.group(1) or 1280)
        height = int(match.group(2) or 720)
        rate = float(match.group(3)) if match.group(3) else 30.0
        try:
            return cls(width, height, rate if fps is None else fps)
        except SourceError as exc:
            raise SourceError(f"bad synthetic source {spec!r}: {exc}") from None

    def open(self) -> None:
        self._stop = threading.Event()

    def render(self, n: int) -> Image:
        frame: Image = self._background.copy()
        h, w = self.height, self.width
        radius = max(4, h // 8)
        x = radius + (n * 7) % max(1, w - 2 * radius)
        y = radius + (n * 3) % max(1, h - 2 * radius)
        cv2.circle(frame, (x, y), radius, (40, 40, 230), -1)
        scale = h / 240
        cv2.putText(
            frame, f"#{n}", (10, int(40 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale,
            (255, 255, 255), max(1, int(2 * scale)), cv2.LINE_AA,
        )
        return frame

    def read(self) -> Image | None:
        self._pacer.wait(self._stop)
        frame = self.render(self.frame_number)
        self.frame_number += 1
        return frame

    def ready(self) -> bool:
        """A read now returns without waiting."""
        return self._pacer.ready()

    def close(self) -> None:
        self._stop.set()
