"""The models the product knows by name, and the defaults on and off the device.

What the settings, the page and the loader agree on, without loading anything: importing this
costs nothing, so the settings' validator can ask a model's result type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from inference.sources.awscam import awscam_available

DEFAULT_MODEL = "efficientnet-lite0"
# The seed's cat/dog sample artifact, pre-optimized in the device's artifact folder.
DEVICE_DEFAULT_MODEL = "/opt/awscam/artifacts/mxnet_resnet18-catsvsdogs_FP32_FUSED.xml"
DEVICE_DEFAULT_LABELS = {0: "dog", 1: "cat"}

BUILTIN: Dict[str, str] = {
    "efficientnet-lite0": "ImageNet-1k classifier (EfficientNet-Lite0, 224x224)",
    "catdog": "the seed's cat/dog classifier: EfficientNet-Lite0's dog and cat classes summed, "
              "and 'neither' for the rest",
    "centerface": "face detector (CenterFace), ssd results with {1: 'face'}",
}
BUILTIN_TYPES: Dict[str, str] = {
    "efficientnet-lite0": "classification", "catdog": "classification", "centerface": "ssd",
}
ALIASES = {"face": "centerface", "efficientnet": "efficientnet-lite0", "cat-dog": "catdog"}


def default_model() -> str:
    return DEVICE_DEFAULT_MODEL if awscam_available() else DEFAULT_MODEL


def canonical(name: str) -> str:
    """The model ``name`` means: the default for "", the built-in for an alias."""
    name = name or default_model()
    return ALIASES.get(name, name)


def model_type_of(name: str) -> str:
    """The result type of a built-in or the device's default model; "" for a user model."""
    name = canonical(name)
    if name == DEVICE_DEFAULT_MODEL:
        return "classification"
    return BUILTIN_TYPES.get(name, "")


def known_model(name: str) -> bool:
    """True when ``name`` could load: built in, or a path that exists, or an artifact on a device."""
    name = canonical(name)
    if name in BUILTIN:
        return True
    if Path(name).expanduser().exists():
        return True
    return awscam_available() and not name.endswith(".onnx")


def display_name(name: str) -> str:
    """How status lines name a model: a path by its file's stem."""
    name = name or default_model()
    return Path(name).stem if "/" in name else name
