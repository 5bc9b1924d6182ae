"""Runtime: the parts wired from Settings, started and stopped in order."""

from __future__ import annotations

import logging
import threading
from typing import Any

from typing_extensions import Protocol

from inference.config import Settings
from inference.hub import FrameHub
from inference.loop import (
    InferenceLoop,
    ModelFactory,
    SourceFactory,
    default_model_factory,
    default_source_factory,
)

log = logging.getLogger(__name__)


class Output(Protocol):
    """A consumer of the hub with its own thread (FIFO writer, IoT publisher)."""

    name: str

    def start(self) -> None: ...

    def stop(self, timeout: float = 2.0) -> None: ...

    def health(self) -> tuple[bool, str]: ...

    def stats(self) -> dict[str, Any]: ...

    def apply(self, settings: Settings) -> None: ...


class Runtime:
    def __init__(
        self,
        settings: Settings,
        source_factory: SourceFactory = default_source_factory,
        model_factory: ModelFactory = default_model_factory,
    ) -> None:
        self.hub = FrameHub(settings.jpeg_quality)
        self.loop = InferenceLoop(settings, self.hub, source_factory, model_factory)
        self.outputs: list[Output] = []
        self._lock = threading.Lock()
        self.started = False

    @property
    def settings(self) -> Settings:
        return self.loop.settings

    def add_output(self, output: Output) -> None:
        self.outputs.append(output)

    def prepare(self, strict: bool = True) -> None:
        self.loop.prepare(strict=strict)

    def start(self) -> None:
        with self._lock:
            if self.started:
                return
            self.loop.start()
            for output in self.outputs:
                output.start()
            self.started = True

    def stop(self, timeout: float = 2.0) -> None:
        with self._lock:
            if not self.started:
                return
            self.started = False
            # Producer first, so outputs see no new work while they drain.
            self.loop.stop(timeout / 2)
            self.hub.close()
            for output in reversed(self.outputs):
                try:
                    output.stop(timeout / 2)
                except Exception:
                    log.exception("stopping output %s failed", output.name)

    def apply(self, changes: dict[str, Any]) -> Settings:
        """Validated live changes -> the loop and the outputs. Raises if a model/source fails."""
        settings = self.loop.update(changes)
        for output in self.outputs:
            output.apply(settings)
        return settings


def build_runtime(settings: Settings) -> Runtime:
    """The loop plus the outputs the settings ask for (FIFO, IoT)."""
    from inference.outputs import build_outputs

    runtime = Runtime(settings)
    for output in build_outputs(settings, runtime.hub):
        runtime.add_output(output)
    return runtime
