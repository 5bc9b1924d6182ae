"""Fake ``mo`` (DeepLens model optimizer): ``optimize(name, w, h, platform, aux_inputs)`` ->
``(error, path)``; 0 ok, 1 platform not supported, 2 optimizer failed. Reads
``<ARTIFACTS>/<name>-symbol.json`` + ``<name>-0000.params`` (MXNet) or ``<name>.pb`` (TF) and
writes the IR ``.xml`` beside them, as the device does. ``FAKE_MO_ARTIFACTS`` sets the folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

calls: list[tuple[str, int, int, str, dict[str, Any]]] = []


def optimize(model_name: str, input_width: int, input_height: int, platform: str = "mx",
             aux_inputs: dict[str, Any] | None = None) -> tuple[int, str]:
    aux = dict(aux_inputs or {})
    calls.append((model_name, input_width, input_height, platform, aux))
    folder = Path(os.environ.get("FAKE_MO_ARTIFACTS", "/opt/awscam/artifacts"))
    if platform not in ("mx", "MXNet", "tf", "TensorFlow", "caffe", "Caffe"):
        return 1, ""
    if input_width > 1024 or input_height > 1024:
        return 2, ""
    if platform in ("mx", "MXNet"):
        symbol = folder / f"{model_name}-symbol.json"
        params = sorted(folder.glob(f"{model_name}-*.params"))
        if not symbol.is_file() or not params:
            return 2, ""
        # The test's "MXNet artifact" names the ONNX graph that stands in for the network.
        onnx = symbol.read_text().strip()
    else:
        pb = folder / f"{model_name}.pb"
        if not pb.is_file():
            return 2, ""
        onnx = pb.read_text().strip()
    precision = str(aux.get("--precision", "FP16"))
    xml = folder / f"mxnet_{model_name}_{precision}_FUSED.xml"
    xml.write_text(f'<net name="{model_name}" onnx="{onnx}" output="SoftMax_67"/>\n')
    return 0, str(xml)
