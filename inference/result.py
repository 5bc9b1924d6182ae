"""The outcome of one frame: the device-form parse, the filtered items people see, timings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from inference.types import ModelInfo, Parsed

STAGES: tuple[str, ...] = ("capture", "preprocess", "inference", "postprocess", "overlay")


@dataclass(frozen=True)
class Item:
    """One entry after labels, top-k and threshold: a class, a detection or a segment."""

    label: int
    name: str
    prob: float
    # ssd only: the box in frame pixels and normalized to 0..1
    box: tuple[float, float, float, float] | None = None
    box_norm: tuple[float, float, float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "name": self.name, "prob": round(self.prob, 6)}
        if self.box is not None and self.box_norm is not None:
            out["box"] = dict(zip(("xmin", "ymin", "xmax", "ymax"), (round(v, 1) for v in self.box)))
            out["box_norm"] = dict(
                zip(("xmin", "ymin", "xmax", "ymax"), (round(v, 5) for v in self.box_norm))
            )
        return out


@dataclass(frozen=True)
class Origin:
    """The file a frame came from: an image of a folder or glob, or a video file (with the
    frame's index in it). Cameras, streams and generated frames have none."""

    name: str
    path: str
    frame: int | None = None

    @classmethod
    def of(cls, path: str, frame: int | None = None) -> Origin:
        return cls(os.path.basename(path) or path, path, frame)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "path": self.path}
        if self.frame is not None:
            out["frame"] = self.frame
        return out


@dataclass(frozen=True)
class Result:
    seq: int
    timestamp: float
    model: ModelInfo | None
    frame_size: tuple[int, int]
    items: tuple[Item, ...] = ()
    # The parseResult form; a classification list cut to its first top_k (Model.parse_top).
    parsed: Parsed = field(default_factory=dict, repr=False)
    timings_ms: dict[str, float] = field(default_factory=dict)
    fps: float = 0.0
    error: str | None = None
    top_k: int = 0
    threshold: float = 0.0
    # Read with the frame, not looked up when the result is shown: a slideshow moves on.
    origin: Origin | None = None

    def payload(self) -> dict[str, float]:
        """The seed's IoT message: ``{label_name: prob}`` of what survived top-k/threshold."""
        out: dict[str, float] = {}
        for item in self.items:
            # Several boxes of one class: keep the most confident, as a dict can hold one.
            if item.name not in out or item.prob > out[item.name]:
                out[item.name] = item.prob
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "timestamp": round(self.timestamp, 6),
            "model": self.model.to_json() if self.model else None,
            "frame_size": list(self.frame_size),
            "source": self.origin.to_json() if self.origin else None,
            "top_k": self.top_k,
            "threshold": self.threshold,
            "results": [item.to_json() for item in self.items],
            "payload": self.payload(),
            "fps": round(self.fps, 2),
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "error": self.error,
        }

