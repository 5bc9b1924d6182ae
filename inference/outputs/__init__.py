"""The standard DeepLens outputs: the project-stream FIFO and the IoT topic."""

from __future__ import annotations

from typing import TYPE_CHECKING

from inference.config import Settings
from inference.hub import FrameHub

if TYPE_CHECKING:
    from inference.runtime import Output


def build_outputs(settings: Settings, hub: FrameHub) -> list[Output]:
    """The outputs ``settings`` asks for (filled in by the FIFO and IoT outputs)."""
    return []
