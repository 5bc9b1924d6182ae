"""Still images: one file, a folder or a glob, shown as a slideshow."""

from __future__ import annotations

import logging
import threading
import time

import cv2

from inference.result import Origin
from inference.sources.files import file_problem
from inference.sources.pacing import Pacer
from inference.types import Image, SourceError

log = logging.getLogger(__name__)

DEFAULT_IMAGE_FPS = 5.0


class ImagesSource:
    """Repeats the current image at ``fps`` and moves on every ``interval`` seconds.

    Unpaced (``fps=0``) it moves on at every read, so ``infer --frames N`` sees N images.
    ``once`` (headless ``infer`` on a folder or glob) hands out each image one time, unpaced,
    then nothing, with :attr:`ended` set. Unreadable files are skipped with a log line; a set
    with no readable image is an error.
    """

    def __init__(
        self, files: list[str], fps: float | None = None, interval: float = 3.0, name: str = "",
        once: bool = False,
    ) -> None:
        self.files = list(files)
        self.once = once
        self.fps = 0.0 if once else (DEFAULT_IMAGE_FPS if fps is None else fps)
        self.interval = interval
        self.name = name or (files[0] if files else "images")
        self.skipped: list[str] = []
        self.ended = False
        self._images: list[tuple[str, Image]] = []
        self._pacer = Pacer(self.fps)
        self._index = 0
        self._shown_since = 0.0
        self._reads = 0
        self._stop = threading.Event()

    def open(self) -> None:
        self._images = []
        self.skipped = []
        for path in self.files:
            # imread of a FIFO would wait for a writer forever, with the control lock held.
            problem = file_problem(path, "image")
            if problem:
                log.warning("skipping %s: %s", path, problem)
                self.skipped.append(path)
                continue
            image = cv2.imread(path, cv2.IMREAD_COLOR)
            if image is None:
                log.warning("skipping %s: not a readable image", path)
                self.skipped.append(path)
                continue
            self._images.append((path, image))
        if not self._images:
            raise SourceError(f"no readable image in {self.name!r}")
        self._index = 0
        self._reads = 0
        self.ended = False
        self._shown_since = time.monotonic()
        self._stop = threading.Event()

    def read(self) -> Image | None:
        return self.read_with_origin()[0]

    def read_with_origin(self) -> tuple[Image | None, Origin | None]:
        """The next frame and the file it is: one step, so the name cannot belong to the next."""
        if not self._images or self.ended:
            return None, None
        if self.once and self._reads >= len(self._images):
            self.ended = True
            return None, None
        self._pacer.wait(self._stop)
        now = time.monotonic()
        if self.fps == 0:
            if self._reads:
                self._index = (self._index + 1) % len(self._images)
        elif now - self._shown_since >= self.interval:
            self._index = (self._index + 1) % len(self._images)
            self._shown_since = now
        self._reads += 1
        path, image = self._images[self._index]
        # The loop draws on the frame it gets: hand out a copy so the stored image stays clean.
        frame: Image = image.copy()
        return frame, Origin.of(path)

    def ready(self) -> bool:
        """A read now returns without waiting (for ``once``, a frame is left)."""
        if self.once:
            return bool(self._images) and self._reads < len(self._images)
        return bool(self._images) and self._pacer.ready()

    def close(self) -> None:
        self._stop.set()
