"""On the device: ``awscam.Model`` with the Intel DLDT (``runtime=0``) or Neo (``runtime=1``)
runtime, after ``mo.optimize`` for an artifact that is not yet an ``.xml``."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import inference.models.parse as parse
from inference.models.preprocess import Preprocess
from inference.types import Image, ModelError, ModelInfo, ModelType, Parsed, RawOutputs

log = logging.getLogger(__name__)

MO_ERRORS = {1: "platform not supported", 2: "model optimizer failed"}


def _import(name: str, option: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ModelError(
            f"{option} needs the DeepLens {name!r} module, which exists only on the device"
        ) from exc


def resolve_artifact(
    artifact: str,
    width: int,
    height: int,
    runtime: int,
    platform: str = "mx",
    aux_inputs: Mapping[str, Any] | None = None,
) -> str:
    """The path ``awscam.Model`` loads: an ``.xml`` (runtime 0), a Neo folder (runtime 1), or
    what ``mo.optimize`` makes of an unoptimized artifact name."""
    path = Path(artifact)
    if runtime == 1:
        if not path.is_dir():
            raise ModelError(f"--model {artifact}: a Neo model (runtime 1) is a folder; not found")
        return str(path)
    if path.suffix == ".xml":
        if not path.is_file():
            raise ModelError(f"--model {artifact}: optimized model file not found")
        return str(path)
    mo = _import("mo", "--model " + artifact)
    error, model_path = mo.optimize(
        artifact, width, height, platform=platform, aux_inputs=dict(aux_inputs or {})
    )
    if error != 0:
        reason = MO_ERRORS.get(int(error), "unknown error")
        raise ModelError(f"mo.optimize failed for artifact {artifact!r}: error {error} ({reason})")
    return str(model_path)


class AwscamModel(parse.CutsAfterParsing):
    def __init__(
        self,
        artifact: str,
        model_type: ModelType,
        labels: Mapping[int, str],
        preprocess: Preprocess,
        gpu: bool = True,
        runtime: int = 0,
        platform: str = "mx",
        aux_inputs: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        awscam = _import("awscam", "--model-backend awscam")
        if runtime == 1 and (model_type != "classification" or not gpu):
            raise ModelError("the Neo runtime (--device-runtime 1) runs classification on the GPU only")
        path = resolve_artifact(
            artifact, preprocess.width, preprocess.height, runtime, platform, aux_inputs
        )
        self.path = path
        try:
            self._model = awscam.Model(path, {"GPU": 1 if gpu else 0}, runtime=runtime)
        except Exception as exc:  # the device library raises bare Exceptions
            raise ModelError(f"awscam.Model could not load {path}: {exc}") from exc
        self._type = model_type
        self._runtime = runtime
        self._preprocess = preprocess
        self.info = ModelInfo(
            name or Path(artifact).stem, model_type, preprocess.width, preprocess.height,
            f"awscam(runtime={runtime}, GPU={1 if gpu else 0})", dict(labels), gpu=gpu,
        )

    def preprocess(self, frame: Image) -> Any:
        return self._preprocess(frame)

    def infer(self, inputs: Any) -> RawOutputs:
        return self._model.doInference(inputs)  # type: ignore[no-any-return]

    def parse(self, raw: RawOutputs) -> Parsed:
        if self._runtime == 1:
            # Neo's parseResult hands the raw dict back unchanged (int keys): parse it here.
            return parse.classification(np.asarray(next(iter(raw.values()))))
        return parse.validate_parsed(self._model.parseResult(self._type, raw), self._type)

    def close(self) -> None:
        self._model = None
