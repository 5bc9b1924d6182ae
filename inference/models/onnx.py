"""Off-device models through ONNX Runtime, any of the three result types."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

import inference.models.parse as parse
from inference.models.preprocess import Preprocess
from inference.types import Image, ModelError, ModelInfo, ModelType, Parsed, RawOutputs

log = logging.getLogger(__name__)

Parser = Callable[[RawOutputs], Parsed]
TopParser = Callable[[RawOutputs, int], Parsed]


def make_session(model: bytes | str | Path, threads: int = 0) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelError("ONNX models need the onnxruntime package (pip install onnxruntime)") from exc
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    where = "<built-in graph>" if isinstance(model, bytes) else str(model)
    try:
        source = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for every bad file
        raise ModelError(f"cannot load ONNX model {where}: {exc}") from exc


def static_input_size(session: Any) -> tuple[int, int] | None:
    """(width, height) from an NCHW/NHWC input shape when it is fixed."""
    shape = session.get_inputs()[0].shape
    if len(shape) != 4:
        return None
    dims = [d if isinstance(d, int) else None for d in shape]
    if dims[1] in (1, 3) and dims[2] and dims[3]:
        return int(dims[3]), int(dims[2])
    if dims[3] in (1, 3) and dims[1] and dims[2]:
        return int(dims[2]), int(dims[1])
    return None


def _class_probabilities(raw: RawOutputs) -> Any:
    out = next(iter(raw.values())).reshape(-1)
    return out if parse.looks_like_probabilities(out) else parse.softmax(out)


def classification_top(raw: RawOutputs, limit: int) -> Parsed:
    """The default classification parse, its first ``limit`` entries only (see parse_top)."""
    return parse.classification(_class_probabilities(raw), limit)


def default_parser(model_type: ModelType, width: int, height: int) -> Parser:
    def parse_classification(raw: RawOutputs) -> Parsed:
        return parse.classification(_class_probabilities(raw))

    def parse_ssd(raw: RawOutputs) -> Parsed:
        arrays = list(raw.values())
        if len(arrays) == 1 and arrays[0].shape[-1] == 7:
            return parse.ssd_from_rows(arrays[0], width, height)
        named = {k.lower(): v for k, v in raw.items()}
        boxes = next((v for k, v in named.items() if "box" in k), None)
        scores = next((v for k, v in named.items() if "score" in k), None)
        labels = next((v for k, v in named.items() if "class" in k or "label" in k), None)
        if boxes is None or scores is None or labels is None:
            raise ValueError(
                "ssd ONNX outputs must be one [.., 7] DetectionOutput tensor or boxes/scores/labels"
                f" tensors; got {sorted(raw)}"
            )
        # TF Object Detection API exports give normalized [ymin, xmin, ymax, xmax].
        tf_style = any(k.startswith("detection_") for k in named)
        normalized = bool(np.nanmax(boxes) <= 1.5) if boxes.size else True
        return parse.ssd_from_boxes(boxes, scores, labels, width, height, tf_style, normalized)

    def parse_segmentation(raw: RawOutputs) -> Parsed:
        return parse.segmentation(next(iter(raw.values())))

    return {
        "classification": parse_classification,
        "ssd": parse_ssd,
        "segmentation": parse_segmentation,
    }[model_type]


class OnnxModel:
    def __init__(
        self,
        name: str,
        model: bytes | str | Path,
        model_type: ModelType,
        labels: Mapping[int, str],
        preprocess: Preprocess | None = None,
        input_size: tuple[int, int] | None = None,
        parser: Parser | None = None,
        threads: int = 0,
        backend: str = "onnxruntime",
    ) -> None:
        self._session = make_session(model, threads)
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"model {name}: expected one input, found {len(inputs)}")
        self._input_name = inputs[0].name
        self._output_names = [o.name for o in self._session.get_outputs()]
        size = input_size or (preprocess.width, preprocess.height) if preprocess else input_size
        fixed = static_input_size(self._session)
        size = size or fixed
        if size is None:
            raise ModelError(f"model {name}: its input size is not fixed; give --input-size WxH")
        if fixed is not None and tuple(size) != fixed:
            # Every frame would fail in the model: refused at load (exit 2, or 422 live).
            raise ModelError(f"model {name} takes {fixed[0]}x{fixed[1]} images only, not "
                             f"{size[0]}x{size[1]}", option="--input-size")
        width, height = size
        if preprocess is None:
            layout = "nhwc" if inputs[0].shape[-1] in (1, 3) else "nchw"
            preprocess = Preprocess(width, height, layout=layout)  # type: ignore[arg-type]
        self._preprocess = preprocess
        self._parser = parser or default_parser(model_type, width, height)
        self._top_parser: TopParser | None = (
            classification_top if parser is None and model_type == "classification" else None
        )
        self.info = ModelInfo(name, model_type, width, height, backend, dict(labels), threads=threads)

    @property
    def preprocessing(self) -> Preprocess:
        return self._preprocess

    def preprocess(self, frame: Image) -> Any:
        return self._preprocess(frame)

    def infer(self, inputs: Any) -> RawOutputs:
        outputs = self._session.run(None, {self._input_name: inputs})
        return dict(zip(self._output_names, outputs))

    def parse(self, raw: RawOutputs) -> Parsed:
        return self._parser(raw)

    def parse_top(self, raw: RawOutputs, limit: int) -> Parsed:
        """``parse`` with a classification list cut to its first ``limit`` entries, as the loop
        keeps it."""
        if self._top_parser is not None:
            return self._top_parser(raw, limit)
        return parse.truncate(self._parser(raw), limit)

    def close(self) -> None:
        self._session = None
