"""The standard DeepLens outputs: the project-stream FIFO and the IoT topic.

Each output is a consumer of the hub with its own thread (see ``inference.runtime.Output``).
``build_outputs`` runs at start: a setting that cannot work (a FIFO path that is a regular file,
``--iot mqtt`` without a broker, a missing certificate) raises ``OutputError`` naming the option,
so the CLI can exit 2 and the Lambda can log and publish it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inference.config import Settings
from inference.hub import FrameHub

if TYPE_CHECKING:
    from inference.runtime import Output


class OutputError(ValueError):
    """An output setting that cannot work; ``option`` is the CLI option to blame (``--fifo``)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


def build_outputs(settings: Settings, hub: FrameHub) -> list[Output]:
    """The outputs ``settings`` asks for: the FIFO unless ``--fifo off``, IoT unless ``--iot off``."""
    outputs: list[Output] = []
    if settings.fifo.strip().lower() != "off":
        from inference.outputs.fifo import FifoWriter

        outputs.append(FifoWriter(settings.fifo, hub, settings.fifo_res, nice=settings.serving_nice))
    if settings.iot != "off":
        from inference.outputs.iot import IotOutput, make_publisher, resolve_thing_name

        thing = resolve_thing_name(settings)
        outputs.append(IotOutput(settings, hub, make_publisher(settings, thing), thing))
    return outputs
