"""The overlay on a rendered frame: as many classification lines as --top-k asks, fitted to the
frame's height."""

from __future__ import annotations

import numpy as np
import pytest

from inference.pipeline import overlay
from inference.pipeline.render import renderer
from inference.result import Item


def items(n: int) -> tuple[Item, ...]:
    return tuple(Item(i, f"class {i}", 0.5 / (i + 1)) for i in range(n))


def render(n: int, height: int) -> np.ndarray:
    """A mid-grey frame of ``height`` rows (16:9) as the stream shows it with ``n`` results."""
    width = height * 16 // 9
    shown = items(n)
    parsed = {"classification": [{"label": i.label, "prob": i.prob} for i in shown]}
    draw = renderer((width, height), (width, height), shown, parsed, True, 25.0, 12.0, None,
                    lambda ms: None)
    assert draw is not None
    return draw(np.full((height, width, 3), 128, np.uint8))


def plates(frame: np.ndarray) -> list[tuple[int, int]]:
    """The text lines drawn above the status line: (first row, last row) of each dark plate."""
    h = frame.shape[0]
    dark = (frame[: h - int(45 * h / 480), : frame.shape[1] // 2] == 0).all(axis=2).any(axis=1)
    bands, start = [], None
    for y, on in enumerate(dark.tolist() + [False]):
        if on and start is None:
            start = y
        elif not on and start is not None:
            bands.append((start, y - 1))
            start = None
    return bands


@pytest.mark.parametrize("height", [272, 480, 720, 1080])
@pytest.mark.parametrize("top_k", [1, 2, 5, 8, 12])
def test_the_overlay_draws_one_line_per_result_up_to_top_k(top_k: int, height: int) -> None:
    # It once drew 4 lines whatever --top-k was.
    bands = plates(render(top_k, height))
    assert len(bands) == top_k
    heights = [b - a for a, b in bands]
    assert heights[0] == max(heights)  # the top label stays the large one, as the seed drew it


@pytest.mark.parametrize("height", [272, 480, 720, 1080])
def test_more_lines_than_fit_are_drawn_smaller_then_counted(
    height: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    status_top = height - 45 * height / 480  # the fps line's rows stay clear
    few = plates(render(3, height))
    if height >= 480:
        fifteen = plates(render(15, height))
        assert len(fifteen) == 15 and fifteen[-1][1] < status_top
        assert fifteen[1][1] - fifteen[1][0] < few[1][1] - few[1][0]  # smaller, to fit
    texts: list[str] = []
    draw = overlay._text_with_background

    def record(frame: np.ndarray, text: str, *args: object) -> int:
        texts.append(text)
        return draw(frame, text, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(overlay, "_text_with_background", record)
    many = plates(render(40, height))
    lines = overlay.classification_lines(height, 40)
    assert 12 <= len(many) == lines < 40 and many[-1][1] < status_top
    # As many results as fit at the smallest legible size; the last line counts the rest.
    assert texts[:lines - 1] == [f"class {i} {50 / (i + 1):.1f}%" for i in range(lines - 1)]
    assert texts[lines - 1] == f"+{40 - lines + 1} more"
