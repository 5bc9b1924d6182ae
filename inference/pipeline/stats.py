"""What the loop reports about itself: frames, fps, time per stage, and its errors with when they
happened (``/health`` reports a model error as recent only for a while after it)."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Deque, Dict, Optional

from inference.result import STAGES


@dataclass
class LoopStats:
    frames: int = 0
    fps: float = 0.0
    model_errors: int = 0
    last_model_error: Optional[str] = None
    last_model_error_at: float = 0.0  # time.monotonic() of the last model error
    model_load_error: Optional[str] = None
    last_frame_time: float = 0.0  # time.time() of the last frame inferred
    stage_ms: Dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    # The loop's OS thread id: what `top -H`, py-spy and /proc/PID/task/ID know it by.
    thread_id: Optional[int] = None
    _times: Deque[float] = field(default_factory=lambda: collections.deque(maxlen=30), repr=False)

    def frame_done(self, timings: Dict[str, float]) -> float:
        """Count a frame and its stage times; returns the fps over the last 30 frames."""
        now = time.monotonic()
        self._times.append(now)
        span = self._times[-1] - self._times[0]
        self.fps = (len(self._times) - 1) / span if len(self._times) > 1 and span > 0 else 0.0
        self.frames += 1
        self.last_frame_time = time.time()
        for stage, ms in timings.items():
            self.record_stage(stage, ms)
        return self.fps

    def no_frame(self) -> None:
        self._times.clear()
        self.fps = 0.0

    def record_stage(self, stage: str, ms: float) -> None:
        # An average over ~20 frames: steady enough to read, quick to follow a change.
        self.stage_ms[stage] = self.stage_ms.get(stage, ms) * 0.95 + ms * 0.05

    def model_failed(self, error: str) -> None:
        self.model_errors += 1
        self.last_model_error = error
        self.last_model_error_at = time.monotonic()

    def model_error_age(self) -> Optional[float]:
        """Seconds since the last model error, or None if there was none."""
        if not self.model_errors:
            return None
        return time.monotonic() - self.last_model_error_at
