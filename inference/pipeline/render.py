"""How a captured frame becomes the frame people see: resized to the display size, results drawn.

The loop does not draw: it hands the hub a :data:`Render` for the frame, which the hub runs for
the first consumer that asks for the picture (a viewer's encoder, the FIFO writer, a snapshot).
A frame nobody watches costs neither the resize nor the drawing.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional, Tuple

import cv2

from inference.logutil import RateLimitedLog
from inference.pipeline import overlay
from inference.pipeline.frames import Render, target_size
from inference.result import Item
from inference.types import Image

log = logging.getLogger(__name__)
_rl = RateLimitedLog(log)


def display_size(width: int, height: int, res: str) -> Tuple[int, int]:
    """The size a frame is drawn at: ``res``, never above the frame's own size (a viewer asking
    for more gets it from the hub's one encode)."""
    dw, dh = target_size(width, height, res)
    return (width, height) if dw > width else (dw, dh)


def scale_items(items: Tuple[Item, ...], sx: float, sy: float) -> Tuple[Item, ...]:
    """Boxes in captured-frame pixels -> pixels of the (resized) display frame."""
    out = []
    for item in items:
        if item.box is not None:
            x0, y0, x1, y1 = item.box
            item = Item(item.label, item.name, item.prob, (x0 * sx, y0 * sy, x1 * sx, y1 * sy),
                        item.box_norm)
        out.append(item)
    return tuple(out)


def renderer(
    size: Tuple[int, int], display: Tuple[int, int], items: Tuple[Item, ...], parsed: Dict[str, Any],
    draw: bool, fps: float, inference_ms: float, error: Optional[str],
    record: Callable[[float], None],
) -> Optional[Render]:
    """The render of one frame, or None when the captured frame is shown as it is. ``record``
    gets the milliseconds the drawing took (the loop's ``stage_ms.overlay``)."""
    (w, h), (dw, dh) = size, display
    if (dw, dh) == (w, h) and not draw:
        return None

    def render(frame: Image) -> Image:
        started = time.perf_counter()
        # A copy, not the captured frame: it stays clean for whoever keeps it (Frame.raw, the
        # recorder's snapshot without the overlay).
        image = frame.copy() if (dw, dh) == (w, h) else cv2.resize(frame, (dw, dh))
        if draw:
            try:
                shown = items if (dw, dh) == (w, h) else scale_items(items, dw / w, dh / h)
                if "classification" in parsed:
                    overlay.draw_classification(image, shown)
                elif "ssd" in parsed:
                    overlay.draw_boxes(image, shown)
                elif "segmentation" in parsed:
                    overlay.draw_segmentation(image, parsed["segmentation"])
                overlay.draw_status(image, fps, inference_ms, error)
            except Exception as exc:
                # This runs on a consumer's thread (an encoder, the FIFO writer): a drawing bug
                # must cost the overlay, not the frame, the stream or the FIFO reader.
                _rl(logging.WARNING, "overlay not drawn: %s", exc, key="overlay")
        record((time.perf_counter() - started) * 1000)
        return image

    return render
