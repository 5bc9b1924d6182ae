"""Hand frames out no faster than a frame rate, without drifting."""

from __future__ import annotations

import threading
import time


class Pacer:
    def __init__(self, fps: float) -> None:
        self.interval = 1.0 / fps if fps > 0 else 0.0
        self._next = 0.0

    def ready(self) -> bool:
        """True when :meth:`wait` would return at once."""
        return not self.interval or time.monotonic() >= self._next

    def wait(self, stop: threading.Event | None = None) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        if self._next > now:
            delay = self._next - now
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
            self._next += self.interval
        else:
            # Late (slow consumer): restart the schedule rather than bursting to catch up.
            self._next = now + self.interval
