"""The standard DeepLens outputs: the project-stream FIFO (:mod:`.fifo`) and the IoT topic
(:mod:`.iot`), both :class:`.base.Output`; :func:`build_outputs` makes the ones the settings ask for."""

from __future__ import annotations

from typing import List

from inference.outputs.base import Output, OutputError
from inference.pipeline.frames import FrameHub
from inference.settings import Settings

__all__ = ["Output", "OutputError", "build_outputs"]


def build_outputs(settings: Settings, hub: FrameHub) -> List[Output]:
    """The FIFO unless ``--fifo off``, the IoT topic unless ``--iot off``, the event recorder
    with ``--record``; raises OutputError naming the option for a setting that cannot work."""
    outputs: List[Output] = []
    if settings.fifo.lower() != "off":
        from inference.outputs.fifo import FifoWriter

        outputs.append(FifoWriter(settings.fifo, hub, settings.fifo_res, nice=settings.serving_nice))
    if settings.iot != "off":
        from inference.outputs.iot import IotOutput

        outputs.append(IotOutput.build(settings, hub))
    if settings.record:
        from inference.events.recorder import Recorder
        from inference.outputs.iot import IotOutput

        recorder = Recorder.build(settings, hub)
        for output in outputs:
            if isinstance(output, IotOutput):  # event notices on its events topic
                recorder.listeners.append(output.notify)
        outputs.append(recorder)
    return outputs
