"""Models by name: the built-in ones, a user ONNX file, or a DeepLens artifact through awscam."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict

import numpy as np

from inference.models.catalog import (
    DEVICE_DEFAULT_LABELS,
    DEVICE_DEFAULT_MODEL,
    canonical,
)
from inference.sources.awscam import awscam_available
from inference.types import Model, ModelError, ModelType

if TYPE_CHECKING:
    from inference.settings import Settings

log = logging.getLogger(__name__)

# ImageNet ids of the seed's two classes: all the dog breeds and the domestic cats.
IMAGENET_DOGS = range(151, 269)
IMAGENET_CATS = range(281, 286)
# The seed's ids 0 dog, 1 cat, and what the seed's two-way softmax could not say.
CATDOG_LABELS = {0: "dog", 1: "cat", 2: "neither"}


@functools.lru_cache(maxsize=1)
def _efficientnet_graph() -> bytes:
    # ~0.3 s to build; a model switch back and forth should not pay it twice.
    from inference.models.efficientnet import build_efficientnet_lite0_onnx

    return build_efficientnet_lite0_onnx()


def _labels(settings: Settings, fallback: Mapping[int, str]) -> Dict[int, str]:
    from inference.models.labels import LabelsError, builtin_labels, load_labels

    if not settings.labels:
        return dict(fallback)
    if settings.labels in ("imagenet", "voc"):
        return builtin_labels(settings.labels)
    try:
        return load_labels(settings.labels)
    except LabelsError as exc:
        raise ModelError(str(exc), option="--labels") from exc


def load_model(settings: Settings) -> Model:
    """Build the model ``settings.model`` names. Raises ModelError naming the path or name."""
    from inference.affinity import auto_threads, available_cpus

    name = canonical(settings.model)
    threads = settings.threads or auto_threads(settings.loop_cpu, available_cpus())
    if name in ("efficientnet-lite0", "catdog"):
        return _efficientnet(name, settings, threads)
    if name == "centerface":
        return _centerface(settings, threads)
    path = Path(name).expanduser()
    backend = settings.model_backend
    if backend == "auto":
        backend = "onnx" if path.suffix.lower() == ".onnx" else "awscam"
    if backend == "onnx":
        return _onnx_file(path, settings, threads)
    return _device_model(name, path, settings)


def _efficientnet(name: str, settings: Settings, threads: int) -> Model:
    import inference.models.parse as parse
    from inference.models.labels import builtin_labels
    from inference.models.onnx import OnnxModel
    from inference.models.preprocess import Preprocess

    w, h = settings.input_size or (224, 224)
    pre = Preprocess(
        w, h, color="rgb", scale=1 / 255, mean=(0.498,) * 3, std=(0.502,) * 3,
        center_crop=0.875 if settings.center_crop is None else settings.center_crop,
    )
    if name == "efficientnet-lite0":
        return OnnxModel(name, _efficientnet_graph(), "classification",
                         _labels(settings, builtin_labels("imagenet")), pre, threads=threads)

    def catdog(raw: Dict[str, Any]) -> Dict[str, Any]:
        probs = next(iter(raw.values())).reshape(-1)
        dog = float(probs[IMAGENET_DOGS.start : IMAGENET_DOGS.stop].sum())
        cat = float(probs[IMAGENET_CATS.start : IMAGENET_CATS.stop].sum())
        # Not renormalised over dog + cat: that called a coffee cup 99 % "dog", and no threshold
        # could filter it. The other 995 classes' share is the honest "neither".
        neither = max(0.0, 1.0 - dog - cat)
        return parse.classification(np.array([dog, cat, neither], np.float32))

    return OnnxModel("catdog", _efficientnet_graph(), "classification",
                     _labels(settings, CATDOG_LABELS), pre, parser=catdog, threads=threads)


def _centerface(settings: Settings, threads: int) -> Model:
    import inference.models.centerface as cf
    from inference.models.onnx import OnnxModel
    from inference.models.preprocess import Preprocess

    w, h = settings.input_size or (480, 288)
    try:
        graph = cf.load_centerface_onnx(w, h)
    except ValueError as exc:
        raise ModelError(str(exc), option="--input-size") from exc

    def face_parser(raw: Dict[str, Any]) -> Dict[str, Any]:
        return {"ssd": cf.decode_centerface(raw, w, h)}

    pre = Preprocess(w, h, color="rgb", scale=1.0, center_crop=0.0)
    return OnnxModel("centerface", graph, "ssd", _labels(settings, {cf.FACE_LABEL: "face"}), pre,
                     parser=face_parser, threads=threads)


def _onnx_file(path: Path, settings: Settings, threads: int) -> Model:
    from inference.models.onnx import OnnxModel

    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    model_type = _model_type(settings, str(path))
    pre = _user_preprocess(settings, None) if settings.input_size else None
    labels = _labels(settings, {})
    model = OnnxModel(path.stem, path, model_type, labels, pre, settings.input_size, threads=threads)
    tuned = any(v is not None for v in (settings.scale, settings.mean, settings.std,
                                          settings.center_crop))
    if (pre is None and tuned) or settings.color != "auto":
        # Preprocessing options apply once the input size is known from the model.
        size = (model.info.input_width, model.info.input_height)
        model = OnnxModel(path.stem, path, model_type, labels,
                          _user_preprocess(settings, size, model.preprocessing.layout),
                          threads=threads)
    _check_label_count(model, labels, settings.labels)
    return model


def _device_model(name: str, path: Path, settings: Settings) -> Model:
    from inference.models.awscam import AwscamModel

    if not awscam_available():
        if not path.exists():
            raise ModelError(f"model file not found: {path}")
        raise ModelError(
            f"--model {name}: DeepLens artifacts run only on the device (no awscam module here); "
            "off the device give an .onnx file or a built-in model"
        )
    model_type = _model_type(settings, name)
    size = settings.input_size or (224, 224)
    pre = _user_preprocess(settings, size, "hwc", device=True)
    labels = _labels(settings, DEVICE_DEFAULT_LABELS if name == DEVICE_DEFAULT_MODEL else {})
    return AwscamModel(
        name, model_type, labels, pre, gpu=settings.device_gpu, runtime=settings.device_runtime,
        platform=settings.mo_platform, aux_inputs=settings.mo_aux,
    )


def _model_type(settings: Settings, name: str) -> ModelType:
    if settings.model_type:
        return settings.model_type
    if name == DEVICE_DEFAULT_MODEL:
        return "classification"
    raise ModelError(
        f"{name}: give --model-type classification|ssd|segmentation", option="--model-type"
    )


def _user_preprocess(
    settings: Settings, size: tuple[int, int] | None, layout: str = "nchw", device: bool = False
) -> Any:
    from inference.models.preprocess import Preprocess

    w, h = size or settings.input_size or (224, 224)
    default_scale = 1.0 if device else 1 / 255
    color = settings.color if settings.color != "auto" else ("bgr" if device else "rgb")
    scale = default_scale if settings.scale is None else settings.scale
    plain = device and settings.scale is None and settings.mean is None and settings.std is None
    return Preprocess(
        w, h, color=color,
        scale=scale,
        mean=settings.mean or (0.0, 0.0, 0.0),
        std=settings.std or (1.0, 1.0, 1.0),
        center_crop=settings.center_crop or 0.0,
        layout=layout,  # type: ignore[arg-type]
        # The device samples hand doInference the resized uint8 frame itself.
        dtype="uint8" if plain else "float32",
    )


def _check_label_count(model: Any, labels: Mapping[int, str], path: str) -> None:
    if not labels or model.info.type != "classification":
        return
    try:
        probe = model.parse(model.infer(model.preprocess(np.zeros((64, 64, 3), np.uint8))))
    except Exception as exc:  # a model that cannot run a blank frame is refused at start
        raise ModelError(f"model {model.info.name} failed on a test frame: {exc}") from exc
    classes = len(probe["classification"])
    if classes != len(labels):
        log.warning(
            "labels file %s has %d names for %d classes: unnamed ids show as numbers",
            path, len(labels), classes,
        )
