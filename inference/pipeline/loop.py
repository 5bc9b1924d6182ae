"""The inference loop: the seed's ``infinite_infer_run`` in a thread that never dies.

frame -> preprocess -> doInference -> parseResult -> labels/top-k/threshold -> the hub, with the
overlay drawn later for whoever looks (:mod:`inference.pipeline.render`). A failed frame read
publishes a NO SIGNAL frame and retries (:class:`~inference.sources.capture.Capture`); a model
exception is logged, counted and shown on the frame, and the next frame is tried.

The loop owns its model and capture while it runs; :class:`~inference.service.Service` hands it
new ones with :meth:`InferenceLoop.swap`, taken between two frames. With a model on the CPU it
keeps a CPU to itself while the model sets the pace (:mod:`inference.affinity`).

When the next frame is already waiting (the model, not the source, sets the pace), a frame is
published just before the next frame's inference rather than as soon as it is made: the threads
it wakes (encoders, the FIFO writer, the IoT publisher, the event loop) then take the GIL while
the model runs without it, instead of while the loop's own capture and preprocess need it. It
costs that frame one capture and preprocess of latency (~1 ms); measured, it is worth ~0.08 of the
model's speed with 20 viewers (docs/design.md). A loop that waits for its source publishes at once.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Any, Dict, Optional, Tuple

from inference.affinity import CpuIsolation, available_cpus, choose_cpu
from inference.compat import native_thread_id
from inference.logutil import RateLimitedLog
from inference.models.parse import select
from inference.pipeline import overlay
from inference.pipeline.frames import FrameHub
from inference.pipeline.render import display_size, renderer
from inference.pipeline.stats import LoopStats
from inference.result import Item, Origin, Result
from inference.settings import Settings
from inference.sources.capture import Capture
from inference.types import FrameSource, Image, Model
from inference.workers import Worker

log = logging.getLogger(__name__)

NO_SIGNAL_SIZE = (858, 480)


class LoopState(str, enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"
    PAUSED = "paused"


class InferenceLoop(Worker):
    name = "inference-loop"

    def __init__(self, settings: Settings, hub: FrameHub, capture: Capture,
                 model: Optional[Model] = None) -> None:
        super().__init__()
        self.settings = settings  # replaced whole by the service; read once per frame
        self.hub = hub
        self.capture = capture
        self.model = model
        self.stats = LoopStats()
        self._running = threading.Event()  # set = not paused
        self._running.set()
        self._swap_lock = threading.Lock()
        self._new_model: Optional[Model] = None
        self._new_source: Optional[FrameSource] = None
        self._new_source_open = True
        self._seq = 0
        self._rl = RateLimitedLog(log)
        self._last_display_size = NO_SIGNAL_SIZE
        self.isolation: Optional[CpuIsolation] = None
        self._pending: Optional[Tuple[Image, Result, Any, Tuple[int, int]]] = None
        # Set once a finite source has no frame left and every frame of it is published.
        self.source_ended = False
        capture.on_open = self._source_opened

    # -- control (from the service) --------------------------------------------------------------
    @property
    def state(self) -> LoopState:
        if not self.alive:
            return LoopState.STOPPED
        return LoopState.RUNNING if self._running.is_set() else LoopState.PAUSED

    def start(self) -> None:
        self._running.set()
        super().start()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def signal_stop(self) -> None:
        super().signal_stop()
        self._running.set()  # wake a paused loop so it sees the stop

    def swap(self, model: Optional[Model] = None, source: Optional[FrameSource] = None,
             source_open: bool = True) -> None:
        """Use ``model`` and/or ``source`` from the next frame on; the ones they replace are
        closed by the loop. A source not yet open (``source_open=False``: a camera or stream) is
        opened by the loop, with its retries. A stopped loop takes them at once."""
        with self._swap_lock:
            if model is not None:
                self._new_model = model
            if source is not None:
                old, self._new_source = self._new_source, source
                self._new_source_open = source_open
                if old is not None:
                    old.close()
        if not self.alive:
            self._take_swaps()

    def _take_swaps(self) -> None:
        with self._swap_lock:
            model, self._new_model = self._new_model, None
            source, self._new_source = self._new_source, None
            source_open = self._new_source_open
        if model is not None:
            old_model, self.model = self.model, model
            self.stats.model_load_error = None
            if old_model is not None and old_model is not model:
                old_model.close()
        if source is not None:
            self.capture.replace(source, opened=source_open)

    def close(self) -> None:
        """Release the source, and one handed over but not taken (the loop must be stopped)."""
        with self._swap_lock:
            pending, self._new_source = self._new_source, None
        if pending is not None:
            pending.close()
        self.capture.close()

    # -- the thread ------------------------------------------------------------------------------
    def run(self) -> None:
        log.info("inference loop started")
        self.stats.thread_id = native_thread_id()
        self.isolation = self._isolation()
        try:
            while not self.stopping.is_set():
                if not self._running.is_set():
                    self._flush()
                    self._running.wait(0.2)
                    continue
                waiting = False
                try:
                    waiting = self.step()
                except Exception as exc:  # the loop is the product: nothing may end it
                    self._rl(logging.ERROR, "unexpected error in the inference loop: %s", exc)
                    log.debug("loop error", exc_info=True)
                    self._flush()
                    self.stopping.wait(0.1)
                if self.isolation is not None:
                    self.isolation.note(waiting)
                    self.isolation.check()
        finally:
            self._flush()
            if self.isolation is not None:
                self.isolation.release()
        log.info("inference loop stopped")

    def _isolation(self) -> Optional[CpuIsolation]:
        """A CPU of its own for this thread, as ``--loop-cpu`` asks (see inference.affinity)."""
        cpus = available_cpus()
        model = self.model
        cpu = choose_cpu(self.settings.loop_cpu, cpus, gpu_model=model is not None and model.info.gpu)
        if cpu is not None and self.settings.loop_cpu == "auto" and model is not None \
                and model.info.threads != 1:
            # The model's own threads would share the loop's one CPU or wait on it: a pinned
            # caller with ONNX Runtime's pool measured x0.38-0.53 of the model alone.
            log.info("inference loop not isolated: the model runs %s intra-op threads",
                     model.info.threads or "one per core")
            cpu = None
        if cpu is None or cpus is None:
            return None
        hub = self.hub
        isolation = CpuIsolation(cpu, cpus, watched=lambda: hub.total_encodes)
        isolation.apply()
        return isolation

    def _source_opened(self) -> None:
        if self.isolation is not None:
            # Its grabber and decoder threads were started here, inheriting our one CPU: give
            # them every CPU back.
            self.isolation.check(force=True)

    def step(self) -> bool:
        """One frame; True when the next one was already waiting (the model sets the pace)."""
        self._take_swaps()
        started = time.perf_counter()
        frame, reason, origin = self.capture.read()
        if frame is None:
            if self.capture.ended:
                # Every file was read (headless infer over a folder): publish what is held and
                # wait for a stop or another source; there is no signal to come back.
                self._flush()
                self.source_ended = True
                self.stopping.wait(0.05)
                return False
            self._no_signal(reason)
            self.capture.backoff(self.stopping)
            return False
        self.source_ended = False
        timestamp = time.time()
        return self.process(frame, timestamp, (time.perf_counter() - started) * 1000.0, origin)

    def process(self, frame: Image, timestamp: float, capture_ms: float,
                origin: Optional[Origin] = None) -> bool:
        settings = self.settings
        timings = {"capture": capture_ms}
        model = self.model
        parsed: Dict[str, Any] = {}
        items: Tuple[Item, ...] = ()
        error: Optional[str] = None
        h, w = frame.shape[:2]
        if model is not None:
            try:
                t0 = time.perf_counter()
                inputs = model.preprocess(frame)
                t1 = time.perf_counter()
                self._flush()  # the previous frame's consumers run while the model has no GIL
                raw = model.infer(inputs)
                t2 = time.perf_counter()
                parsed = model.parse_top(raw, settings.top_k)
                items = select(parsed, model.info, settings.top_k, settings.threshold, (w, h))
                t3 = time.perf_counter()
                timings.update(preprocess=(t1 - t0) * 1000, inference=(t2 - t1) * 1000,
                               postprocess=(t3 - t2) * 1000)
            except Exception as exc:
                error = f"model error: {exc}" if str(exc) else f"model error: {type(exc).__name__}"
                self.stats.model_failed(error)
                self._rl(logging.WARNING, "%s", error)
                parsed, items = {}, ()
        else:
            error = f"model not loaded: {self.stats.model_load_error or 'no model'}"
        display = display_size(w, h, settings.display_res)
        fps = self.stats.frame_done(timings)
        render = renderer((w, h), display, items, parsed, settings.overlay, fps,
                          timings.get("inference", 0.0), error,
                          lambda ms: self.stats.record_stage("overlay", ms))
        self._seq += 1
        result = Result(
            seq=self._seq, timestamp=timestamp, model=model.info if model else None,
            frame_size=(w, h), items=items, parsed=parsed, timings_ms=timings, fps=fps,
            error=error, top_k=settings.top_k, threshold=settings.threshold, origin=origin,
        )
        self._last_display_size = display
        self._flush()
        waiting = self.capture.ready()
        if error is None and waiting:
            self._pending = (frame, result, render, display)
        else:
            self.hub.publish(frame, result, render, display)
        return waiting

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self.hub.publish(*pending)

    def _no_signal(self, reason: str) -> None:
        self._flush()
        attempt = self.capture.failed(reason)
        self.stats.no_frame()
        self._seq += 1
        frame = overlay.no_signal_frame(self._last_display_size, reason, attempt)
        result = Result(
            seq=self._seq, timestamp=time.time(),
            model=self.model.info if self.model else None, frame_size=self._last_display_size,
            error=f"no signal: {reason}", top_k=self.settings.top_k,
            threshold=self.settings.threshold,
        )
        self.hub.publish(frame, result)
