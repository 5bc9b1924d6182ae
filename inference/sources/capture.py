"""Reading a camera that may fail: the source opened when needed, a failed read retried with
backoff, the source reopened every third failure in a row (often what fixes a camera or a
stream), and the reason kept for the NO SIGNAL frame and ``/health``. Nothing here ever raises
to the loop."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Tuple

from inference.logutil import RateLimitedLog
from inference.result import Origin
from inference.types import FrameSource, Image

log = logging.getLogger(__name__)

MAX_BACKOFF = 2.0
REOPEN_AFTER_FAILURES = 3


class Capture:
    def __init__(self, factory: Callable[[], FrameSource]) -> None:
        self._factory = factory
        # Called on the reading thread right after a source opens (it may have started threads).
        self.on_open: Callable[[], None] = lambda: None
        self.source: Optional[FrameSource] = None
        self._open = False
        self._rl = RateLimitedLog(log)
        self.failures = 0
        self.consecutive_failures = 0
        self.reopens = 0
        self.last_error: Optional[str] = None
        # ("opening" or "reading", since when): what the reading thread waits on right now, for
        # /health; a wait inside a source cannot say so itself while it lasts.
        self._busy: Optional[Tuple[str, float]] = None

    @property
    def name(self) -> str:
        return self.source.name if self.source is not None else "(no source)"

    @property
    def ended(self) -> bool:
        """A finite source (``infer`` over a folder) has handed out every frame it has: no
        frame is a normal end, not a failure to retry."""
        return bool(getattr(self.source, "ended", False))

    def read(self) -> Tuple[Optional[Image], str, Optional[Origin]]:
        """The next frame and the file it came from (None from a camera), or None and why not."""
        try:
            source = self.source
            if source is None:
                self.source = source = self._factory()
            if not self._open:
                self._busy = ("opening", time.monotonic())
                source.open()
                self._open = True
                self.on_open()
            self._busy = ("reading", time.monotonic())
            frame, origin = _read(source)
        except Exception as exc:
            return None, str(exc) or type(exc).__name__, None
        finally:
            self._busy = None
        if frame is None:
            if getattr(source, "ended", False):
                return None, f"end of {source.name}", None
            return None, f"no frame from {source.name}", None
        if self.consecutive_failures:
            log.info("source back after %d failed reads", self.consecutive_failures)
        self.consecutive_failures = 0
        self.last_error = None
        return frame, "", origin

    def waiting(self) -> Optional[Tuple[str, float]]:
        """What the reading thread has been waiting on for how long: ``("opening", seconds)`` or
        ``("reading", seconds)``, or None between reads."""
        busy = self._busy
        return None if busy is None else (busy[0], time.monotonic() - busy[1])

    def failed(self, reason: str) -> int:
        """Count a failed read; returns how many failed in a row."""
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error = reason
        self._rl(logging.WARNING, "no frame (%s); retrying", reason)
        if self.consecutive_failures % REOPEN_AFTER_FAILURES == 0:
            self.close()
            self.reopens += 1
        return self.consecutive_failures

    def backoff(self, stop: threading.Event) -> None:
        """Wait before the next try: 0.1 s doubling up to MAX_BACKOFF, cut short by ``stop``."""
        n = self.consecutive_failures
        stop.wait(min(MAX_BACKOFF, 0.05 * 2 ** min(n, 6)))

    def ready(self) -> bool:
        """The next frame is waiting: the loop, not the source, sets the pace."""
        try:
            return self._open and self.source is not None and bool(self.source.ready())
        except Exception:
            return False

    def replace(self, source: FrameSource, opened: bool = True) -> None:
        """Read from ``source`` from now on (opened at the next read unless ``opened``); the old
        one is closed."""
        self.close()
        self.source = source
        self._open = opened
        self.consecutive_failures = 0
        self.last_error = None

    def close(self) -> None:
        if self.source is not None and self._open:
            try:
                self.source.close()
            except Exception:
                log.exception("closing the source failed")
        self._open = False



def _read(source: FrameSource) -> Tuple[Optional[Image], Optional[Origin]]:
    # A source that knows its files returns the frame and its file from one call; any other
    # (a camera, a test's fake) returns just the frame.
    read_with_origin = getattr(source, "read_with_origin", None)
    if read_with_origin is not None:
        frame, origin = read_with_origin()
        return frame, origin
    return source.read(), None
