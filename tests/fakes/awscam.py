"""Fake ``awscam`` following the documented DeepLens API exactly (tests only).

- ``getLastFrame()`` -> ``(bool, BGR uint8 ndarray)``; frames come from ``FAKE_AWSCAM_VIDEO``
  (a video or image file) or a synthetic pattern. While the file named by ``FAKE_AWSCAM_FAIL_FILE``
  exists (or ``fail_reads`` > 0), it returns ``(False, None)`` as a broken camera does.
- ``Model(path, {'GPU': 1|0}, runtime=0|1)``; ``doInference(img)`` -> dict of arrays;
  ``parseResult(model_type, raw)`` -> ``{model_type: [...]}``. The "optimized model" is an XML file
  whose ``<net onnx="..." type="..."/>`` names an ONNX graph that really runs, so device-path
  tests see real results.
"""

from __future__ import annotations

import sys

# On the device cv2 must come after awscam; tests read this to check our entry points.
CV2_IMPORTED_BEFORE_AWSCAM = "cv2" in sys.modules

import os
import re
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np

_lock = threading.Lock()
_cap: Any = None
_image: Any = None
_counter = 0
fail_reads = 0  # tests may set: the next N reads fail
calls = {"getLastFrame": 0, "Model": 0, "doInference": 0, "parseResult": 0}
loaded: list[tuple[str, dict[str, int], int]] = []


def _synthetic(n: int) -> np.ndarray:
    frame = np.full((1520, 2688, 3), 90, np.uint8)
    cv2.circle(frame, (200 + (n * 13) % 2200, 760), 120, (30, 30, 220), -1)
    return frame


def getLastFrame() -> tuple[bool, Any]:  # noqa: N802 - the device's name
    global _cap, _image, _counter, fail_reads
    with _lock:
        calls["getLastFrame"] += 1
        fail_file = os.environ.get("FAKE_AWSCAM_FAIL_FILE")
        if fail_reads > 0:
            fail_reads -= 1
            return False, None
        if fail_file and os.path.exists(fail_file):
            return False, None
        _counter += 1
        src = os.environ.get("FAKE_AWSCAM_VIDEO", "")
        if not src:
            return True, _synthetic(_counter)
        if Path(src).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
            if _image is None:
                _image = cv2.imread(src)
            return True, _image.copy()
        if _cap is None:
            _cap = cv2.VideoCapture(src)
        ok, frame = _cap.read()
        if not ok:
            _cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = _cap.read()
        return bool(ok), frame if ok else None


class Model:
    def __init__(self, model_topology_file: str, loading_config: dict[str, int], runtime: int = 0):
        calls["Model"] += 1
        if not isinstance(loading_config, dict) or set(loading_config) != {"GPU"}:
            raise Exception("loading_config must be {'GPU': 1} or {'GPU': 0}")
        if loading_config["GPU"] not in (0, 1):
            raise Exception("GPU must be 0 or 1")
        if runtime not in (0, 1):
            raise Exception("runtime must be 0 (DLDT) or 1 (Neo)")
        path = Path(model_topology_file)
        if runtime == 1:
            if not path.is_dir():
                raise Exception(f"Neo model folder not found: {path}")
            xml = next(path.glob("*.xml"), None)
            if xml is None:
                raise Exception(f"no compiled model in {path}")
            path = xml
        elif path.suffix != ".xml" or not path.is_file():
            raise Exception(f"model file not found: {model_topology_file}")
        text = path.read_text()
        onnx_path = re.search(r'onnx="([^"]+)"', text)
        if not onnx_path:
            raise Exception(f"{path} is not a model this device can load")
        import onnxruntime as ort

        self._session = ort.InferenceSession(onnx_path.group(1), providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0]
        self._runtime = runtime
        out_name = re.search(r'output="([^"]+)"', text)
        self._output_layer = out_name.group(1) if out_name else "SoftMax_67"
        shape = self._input.shape
        self.input_hw = (int(shape[2]), int(shape[3]))
        loaded.append((str(model_topology_file), dict(loading_config), runtime))

    def doInference(self, frame: np.ndarray) -> dict[Any, np.ndarray]:  # noqa: N802
        calls["doInference"] += 1
        h, w = self.input_hw
        if frame.shape[:2] != (h, w):
            raise Exception(f"input must be {w}x{h}, got {frame.shape[1]}x{frame.shape[0]}")
        # The device takes the resized BGR uint8 frame; this graph wants normalized RGB NCHW.
        x = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB).astype(np.float32)
        x = ((x / 255.0 - 0.498) / 0.502).transpose(2, 0, 1)[None]
        out = self._session.run(None, {self._input.name: x})[0]
        if self._runtime == 1:
            return {0: out.reshape(-1)}
        return {self._output_layer: out.reshape(-1)}

    def parseResult(self, model_type: str, raw: dict[Any, np.ndarray]) -> Any:  # noqa: N802
        calls["parseResult"] += 1
        if self._runtime == 1:
            return raw
        arr = next(iter(raw.values()))
        if model_type == "classification":
            order = np.argsort(-arr)
            return {"classification": [{"label": int(i), "prob": float(arr[i])} for i in order]}
        if model_type == "ssd":
            h, w = self.input_hw
            rows = arr.reshape(-1, 7)
            return {"ssd": [
                {"label": int(r[1]), "prob": float(r[2]), "xmin": float(r[3] * w),
                 "ymin": float(r[4] * h), "xmax": float(r[5] * w), "ymax": float(r[6] * h)}
                for r in rows if r[2] > 0
            ]}
        raise Exception(f"unsupported model type {model_type}")


def reset() -> None:
    global _cap, _image, _counter, fail_reads
    with _lock:
        _cap, _image, _counter, fail_reads = None, None, 0, 0
        for k in calls:
            calls[k] = 0
        loaded.clear()
