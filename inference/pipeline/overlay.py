"""Draw results on the frame shown to people. Sizes follow the frame height so text stays legible
at 480p (858x480), 720p and 1080p alike. Functions draw in place on the frame they are given."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import cv2
import numpy as np
import numpy.typing as npt

from inference.result import Item
from inference.types import Image

FONT = cv2.FONT_HERSHEY_SIMPLEX
# The seed draws its label in (255, 165, 20) BGR at (10, 70) on the 1520-row camera frame.
SEED_COLOUR = (255, 165, 20)


def _scale(frame: Image) -> float:
    return float(frame.shape[0]) / 480.0


def _palette(n: int) -> npt.NDArray[np.uint8]:
    rng = np.random.default_rng(7)
    colours = rng.integers(40, 255, size=(max(n, 1), 3), dtype=np.uint8)
    colours[0] = 0  # class 0 is background in the usual segmentation label sets
    return colours


@functools.lru_cache(maxsize=4)
def palette(n: int = 256) -> npt.NDArray[np.uint8]:
    return _palette(n)


def colour_for(label: int) -> tuple[int, int, int]:
    c = palette()[label % 256]
    if label % 256 == 0:
        return SEED_COLOUR
    return int(c[0]), int(c[1]), int(c[2])


def _text_with_background(
    frame: Image, text: str, org: tuple[int, int], scale: float, colour: tuple[int, int, int],
    thickness: int,
) -> None:
    (tw, th), base = cv2.getTextSize(text, FONT, scale, thickness)
    x, y = org
    x = min(max(0, x), max(0, frame.shape[1] - tw - 4))
    y = min(max(th + 4, y), frame.shape[0] - base - 2)
    # A dark plate under the text keeps it readable on any background.
    cv2.rectangle(frame, (x, y - th - 4), (x + tw + 4, y + base + 2), (0, 0, 0), -1)
    cv2.putText(frame, text, (x + 2, y), FONT, scale, colour, thickness, cv2.LINE_AA)


def draw_classification(frame: Image, items: Sequence[Item]) -> None:
    """The seed's style: the top label near the top-left, large, with its probability."""
    if not items:
        return
    s = _scale(frame)
    top = items[0]
    _text_with_background(
        frame, f"{top.name} {top.prob * 100:.1f}%", (int(10 * s), int(50 * s)), 1.1 * s,
        SEED_COLOUR, max(1, int(round(2.5 * s))),
    )
    for i, item in enumerate(items[1:4], start=1):
        _text_with_background(
            frame, f"{item.name} {item.prob * 100:.1f}%", (int(10 * s), int((50 + 34 * i) * s)),
            0.7 * s, (230, 230, 230), max(1, int(round(1.5 * s))),
        )


def draw_boxes(frame: Image, items: Sequence[Item]) -> None:
    """Boxes are already in frame pixels (float scales from model input, see parse.select)."""
    s = _scale(frame)
    thickness = max(1, int(round(2 * s)))
    for item in items:
        if item.box is None:
            continue
        x0, y0, x1, y1 = (int(round(v)) for v in item.box)
        colour = colour_for(item.label)
        cv2.rectangle(frame, (x0, y0), (x1, y1), colour, thickness)
        _text_with_background(
            frame, f"{item.name}: {item.prob * 100:.2f}%", (x0, y0 - int(4 * s)), 0.6 * s,
            colour, max(1, int(round(1.5 * s))),
        )


def draw_segmentation(frame: Image, class_map: npt.NDArray[np.int32], alpha: float = 0.45) -> None:
    h, w = frame.shape[:2]
    mask = cv2.resize(class_map.astype(np.uint16), (w, h), interpolation=cv2.INTER_NEAREST)
    colours = palette()[mask % 256]
    fg = mask > 0
    blended = cv2.addWeighted(frame, 1 - alpha, colours, alpha, 0)
    frame[fg] = blended[fg]


def draw_status(frame: Image, fps: float, inference_ms: float, error: str | None = None) -> None:
    s = _scale(frame)
    h = frame.shape[0]
    text = f"{fps:.1f} fps | inference {inference_ms:.1f} ms"
    _text_with_background(frame, text, (int(8 * s), h - int(10 * s)), 0.5 * s, (200, 255, 200),
                          max(1, int(round(1.2 * s))))
    if error:
        _text_with_background(frame, error[:80], (int(8 * s), h - int(34 * s)), 0.5 * s,
                              (60, 60, 255), max(1, int(round(1.2 * s))))


def no_signal_frame(size: tuple[int, int], reason: str, attempt: int) -> Image:
    w, h = size
    frame = np.full((h, w, 3), 32, np.uint8)
    s = h / 480.0
    text = "NO SIGNAL"
    scale, thick = 2.0 * s, max(2, int(round(4 * s)))
    (tw, th), _ = cv2.getTextSize(text, FONT, scale, thick)
    cv2.putText(frame, text, ((w - tw) // 2, (h + th) // 2), FONT, scale, (80, 80, 255), thick,
                cv2.LINE_AA)
    detail = f"{reason[:70]} (retry {attempt})"
    (dw, _), _ = cv2.getTextSize(detail, FONT, 0.55 * s, max(1, int(s)))
    cv2.putText(frame, detail, (max(4, (w - dw) // 2), (h + th) // 2 + int(40 * s)), FONT,
                0.55 * s, (220, 220, 220), max(1, int(s)), cv2.LINE_AA)
    return frame
