"""Tiny ONNX graphs built in the tests, for the model types no packaged weights cover."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, inits) -> bytes:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def classifier(num_classes: int = 4, size: int = 32, softmax: bool = True) -> bytes:
    """Mean colour -> linear -> (softmax): class 0 is red, 1 green, 2 blue."""
    w = np.zeros((3, num_classes), np.float32)
    w[0, 0] = w[1, 1] = w[2, 2] = 8.0  # input channels are RGB: red -> 0, green -> 1, blue -> 2
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
    ]
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        out = "probs"
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, num_classes])],
        [numpy_helper.from_array(w, "w")],
    )


def segmenter(size: int = 16) -> bytes:
    """Per-pixel scores for 3 classes: 0 background, 1 'red' pixels, 2 'green' pixels."""
    w = np.zeros((3, 3, 1, 1), np.float32)
    w[0, :, 0, 0] = [0.2, 0.2, 0.2]
    w[1, :, 0, 0] = [1.0, -1.0, -1.0]  # R channel
    w[2, :, 0, 0] = [-1.0, 1.0, -1.0]  # G channel
    return _model(
        [helper.make_node("Conv", ["input", "w"], ["scores"])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3, size, size])],
        [numpy_helper.from_array(w, "w")],
    )


def detector(rows: list[list[float]], size: int = 300) -> bytes:
    """A DetectionOutput-style [1, 1, N, 7] output with fixed rows (normalized boxes)."""
    arr = np.asarray(rows, np.float32).reshape(1, 1, -1, 7)
    zero = np.zeros((1,), np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "zero"], ["z"]),
        helper.make_node("Add", ["rows", "z"], ["detection_out"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("detection_out", TensorProto.FLOAT, list(arr.shape))],
        [numpy_helper.from_array(arr, "rows"), numpy_helper.from_array(zero, "zero")],
    )
