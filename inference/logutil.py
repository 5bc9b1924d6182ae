"""Logging helpers shared by the threads that may fail at the frame rate."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """One line per key per interval: a broken camera or broker must not flood the log."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}

    def __call__(self, level: int, message: str, *args: object, key: str | None = None) -> None:
        key = message if key is None else key
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.interval:
            self._last[key] = now
            self.logger.log(level, message, *args)
