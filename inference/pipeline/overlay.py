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
) -> int:
    """Draws ``text`` with its baseline at ``org``, kept inside the frame; the plate's last row."""
    (tw, th), base = cv2.getTextSize(text, FONT, scale, thickness)
    x, y = org
    x = min(max(0, x), max(0, frame.shape[1] - tw - 4))
    y = min(max(th + 4, y), frame.shape[0] - base - 2)
    # A dark plate under the text keeps it readable on any background.
    cv2.rectangle(frame, (x, y - th - 4), (x + tw + 4, y + base + 2), (0, 0, 0), -1)
    cv2.putText(frame, text, (x + 2, y), FONT, scale, colour, thickness, cv2.LINE_AA)
    return int(y + base + 2)


# Classification lines, sized for a 480-row frame and scaled with the height: the top label's
# baseline, the other lines' font at full size and at the smallest still legible, the gap
# between two plates, and the rows kept clear at the bottom for the fps and error lines.
_TOP_Y, _FONT, _MIN_FONT, _GAP, _STATUS_ROWS = 50, 0.7, 0.45, 5, 45


def _gap(s: float) -> int:
    return max(2, int(round(_GAP * s)))


def _plate_height(font: float, thickness: int, gap: int) -> int:
    (_, th), base = cv2.getTextSize("Ag 0.0%", FONT, font, thickness)
    return th + base + 6 + gap  # as _text_with_background draws it, and the gap below


def _top_style(s: float) -> tuple[float, int]:
    return 1.1 * s, max(1, int(round(2.5 * s)))


def _layout(height: int, count: int) -> tuple[float, int, int]:
    """(font, thickness, lines) for ``count`` results on a frame of ``height`` rows: every line
    at full size when they fit, else smaller down to _MIN_FONT, else as many lines as fit at that
    size (the last then says how many more there are)."""
    s = height / 480.0
    font, thickness = _top_style(s)
    (_, th), base = cv2.getTextSize("Ag 0.0%", FONT, font, thickness)
    gap = _gap(s)
    top_bottom = max(th + 4, int(_TOP_Y * s)) + base + 2 + gap
    room = height - _STATUS_ROWS * s - top_bottom
    rest = count - 1
    font = _FONT * s
    while True:
        thickness = max(1, int(round(1.5 * font / 0.7)))
        fit = max(0, int(room // _plate_height(font, thickness, gap)))
        if fit >= rest or font <= _MIN_FONT * s:
            break
        font = max(_MIN_FONT * s, font * 0.92)
    return font, thickness, 1 + min(rest, fit)


def classification_lines(height: int, count: int) -> int:
    """How many lines ``count`` classification results take on a frame of ``height`` rows."""
    return _layout(height, count)[2] if count else 0


def draw_classification(frame: Image, items: Sequence[Item]) -> None:
    """The seed's style: the top label near the top-left, large, with its probability; below it
    one line per further result (the loop keeps --top-k of them). Lines that do not fit above
    the fps line are drawn smaller, down to a legible minimum; past that the last line that fits
    says how many more there are (all of them are in /results)."""
    if not items:
        return
    s = _scale(frame)
    top = items[0]
    top_font, top_thickness = _top_style(s)
    bottom = _text_with_background(
        frame, f"{top.name} {top.prob * 100:.1f}%", (int(10 * s), int(_TOP_Y * s)), top_font,
        SEED_COLOUR, top_thickness,
    )
    font, thickness, lines = _layout(frame.shape[0], len(items))
    gap = _gap(s)
    rest = items[1:]
    for i in range(lines - 1):
        if i == lines - 2 and lines - 1 < len(rest):
            text = f"+{len(rest) - i} more"
        else:
            text = f"{rest[i].name} {rest[i].prob * 100:.1f}%"
        (_, th), _ = cv2.getTextSize(text, FONT, font, thickness)
        bottom = _text_with_background(frame, text, (int(10 * s), bottom + gap + th + 4), font,
                                       (230, 230, 230), thickness)


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
