"""The DeepLens camera: ``awscam.getLastFrame()``. The only module that imports awscam for frames."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from types import ModuleType

from inference.sources.pacing import Pacer
from inference.types import Image, SourceError

log = logging.getLogger(__name__)


def awscam_available() -> bool:
    """True on a DeepLens: the device's ``awscam`` module can be imported."""
    return importlib.util.find_spec("awscam") is not None


def preload_awscam() -> bool:
    """Import awscam before anything imports cv2: the device's cv2 build depends on it.

    Call first thing in an entry point; this module imports nothing that pulls in cv2.
    """
    if not awscam_available():
        return False
    try:
        importlib.import_module("awscam")
    except Exception:  # a broken device library must surface where the source opens
        log.exception("importing awscam failed")
        return False
    return True


def import_awscam() -> ModuleType:
    try:
        return importlib.import_module("awscam")
    except ImportError as exc:
        raise SourceError(
            "--source awscam needs the DeepLens 'awscam' module, which exists only on the device"
        ) from exc


class AwscamSource:
    name = "awscam"

    def __init__(self, fps: float | None = None) -> None:
        # getLastFrame returns the camera's latest frame without waiting for a new one; a cap
        # keeps a fast model from processing the same frame over and over.
        self.fps = 30.0 if fps is None else fps
        self._awscam: ModuleType | None = None
        self._pacer = Pacer(self.fps)
        self._stop = threading.Event()

    def open(self) -> None:
        self._awscam = import_awscam()
        self._stop = threading.Event()

    def read(self) -> Image | None:
        if self._awscam is None:
            return None
        self._pacer.wait(self._stop)
        ret, frame = self._awscam.getLastFrame()
        if not ret or frame is None:
            return None
        return frame  # type: ignore[no-any-return]

    def ready(self) -> bool:
        """A read now returns without waiting (getLastFrame itself never waits)."""
        return self._awscam is not None and self._pacer.ready()

    def close(self) -> None:
        self._stop.set()
