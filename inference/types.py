"""Value types and protocols shared by the pipeline, its sources, models and outputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict

import numpy.typing as npt
from typing_extensions import Literal, Protocol, runtime_checkable

ModelType = Literal["classification", "ssd", "segmentation"]
MODEL_TYPES: tuple[ModelType, ...] = ("classification", "ssd", "segmentation")

Image = npt.NDArray[Any]
"""An H x W x 3 BGR uint8 frame, the layout of ``awscam.getLastFrame()``."""

RawOutputs = Dict[str, npt.NDArray[Any]]
"""What ``Model.doInference`` returns: output-layer name -> array."""

Parsed = Dict[str, Any]
"""What ``Model.parseResult`` returns: ``{model_type: [...]}``."""


class SourceError(RuntimeError):
    """A frame source cannot deliver frames (for now or for good)."""


class ModelError(RuntimeError):
    """A model cannot be loaded or cannot run; ``option`` is the CLI option to blame."""

    def __init__(self, message: str, option: str = "--model") -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class ModelInfo:
    name: str
    type: ModelType
    input_width: int
    input_height: int
    backend: str
    labels: Mapping[int, str] = field(default_factory=dict, repr=False, compare=False)
    gpu: bool = False  # runs on the device's GPU: its loop mostly waits
    threads: int = 1  # intra-op threads on the CPU (0: one per core)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "input_size": [self.input_width, self.input_height],
            "backend": self.backend,
            # How many results a classification can give at most (0: unknown, no label names).
            "classes": len(self.labels),
        }


@runtime_checkable
class FrameSource(Protocol):
    """Hands out BGR frames. ``read`` returns the newest frame, or None when none is available."""

    name: str

    def open(self) -> None: ...

    def read(self) -> Image | None: ...

    def ready(self) -> bool:
        """A read now would return without waiting (the loop, not the source, sets the pace)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Model(Protocol):
    """The three stages of the device API: resize/preprocess, ``doInference``, ``parseResult``."""

    info: ModelInfo

    def preprocess(self, frame: Image) -> Any: ...

    def infer(self, inputs: Any) -> RawOutputs: ...

    def parse(self, raw: RawOutputs) -> Parsed: ...

    def parse_top(self, raw: RawOutputs, limit: int) -> Parsed:
        """``parse`` with a classification list cut to its first ``limit`` entries, all the
        loop keeps (the seed keeps ``[0:num_top_k]`` too); a model may build only those."""
        ...

    def close(self) -> None: ...
