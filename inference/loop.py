"""InferenceLoop: the DeepLens loop of the seed, in a thread that never dies.

frame -> preprocess -> doInference -> parseResult -> labels/top-k/threshold -> overlay -> hub.
A failed frame read shows a NO SIGNAL frame and retries with backoff; a model exception is
logged, counted and shown on the frame, and the next frame is tried.

When the next frame is already waiting (the model, not the source, sets the pace), a frame's
result is published just before the next frame's inference instead of as soon as it is known:
the consumers it wakes (encoders, viewers, FIFO, IoT) then run their Python while the loop is
inside the model with the GIL released, rather than taking the GIL from the loop's own
preprocess and postprocess. It costs that result one preprocess of latency (~0.3 ms); a loop
that waits for its source publishes at once. See bench/README.md, section 1.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2

from inference import overlay
from inference.affinity import CpuIsolation, available_cpus, choose_cpu, unconfined
from inference.compat import native_thread_id
from inference.config import Settings
from inference.hub import FrameHub, Render, target_size
from inference.logutil import RateLimitedLog
from inference.models.parse import parse_first, select
from inference.result import STAGES, Item, Result
from inference.types import FrameSource, Image, Model

log = logging.getLogger(__name__)

SourceFactory = Callable[[Settings], FrameSource]
ModelFactory = Callable[[Settings], Model]

MAX_BACKOFF = 2.0
REOPEN_AFTER_FAILURES = 3
NO_SIGNAL_SIZE = (858, 480)


class LoopState(str, enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"
    PAUSED = "paused"


@dataclass
class LoopStats:
    frames: int = 0
    model_errors: int = 0
    capture_failures: int = 0
    consecutive_failures: int = 0
    source_reopens: int = 0
    last_capture_error: str | None = None
    last_model_error: str | None = None
    model_load_error: str | None = None
    last_frame_time: float = 0.0
    stage_ms: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    fps: float = 0.0
    # The loop's OS thread id: what `top -H`, py-spy and /proc/PID/task/ID know it by.
    thread_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "fps": round(self.fps, 2),
            "model_errors": self.model_errors,
            "capture_failures": self.capture_failures,
            "consecutive_failures": self.consecutive_failures,
            "source_reopens": self.source_reopens,
            "last_capture_error": self.last_capture_error,
            "last_model_error": self.last_model_error,
            "model_load_error": self.model_load_error,
            "stage_ms": {k: round(v, 3) for k, v in self.stage_ms.items()},
        }


def default_source_factory(settings: Settings) -> FrameSource:
    from inference.sources import default_source, make_source

    return make_source(
        settings.source or default_source(), fps=settings.source_fps,
        interval=settings.slide_interval,
    )


def default_model_factory(settings: Settings) -> Model:
    from inference.models import load_model

    return load_model(settings)


def scale_items(items: tuple[Item, ...], sx: float, sy: float) -> tuple[Item, ...]:
    """Boxes in captured-frame pixels -> pixels of the (resized) display frame."""
    out = []
    for item in items:
        if item.box is not None:
            x0, y0, x1, y1 = item.box
            item = Item(item.label, item.name, item.prob, (x0 * sx, y0 * sy, x1 * sx, y1 * sy),
                        item.box_norm)
        out.append(item)
    return tuple(out)


class InferenceLoop:
    def __init__(
        self,
        settings: Settings,
        hub: FrameHub | None = None,
        source_factory: SourceFactory = default_source_factory,
        model_factory: ModelFactory = default_model_factory,
    ) -> None:
        self.settings = settings
        self.hub = hub or FrameHub(settings.jpeg_quality)
        self.stats = LoopStats()
        self._source_factory = source_factory
        self._model_factory = model_factory
        self._source: FrameSource | None = None
        self._source_open = False
        self._model: Model | None = None
        self._pending_source: FrameSource | None = None
        self._switch_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._running = threading.Event()  # set = not paused
        self._seq = 0
        self._frame_times: collections.deque[float] = collections.deque(maxlen=30)
        self._rl = RateLimitedLog(log)
        self._last_display_size = NO_SIGNAL_SIZE
        # A frame's publication held back until the next frame's inference starts (see above).
        self._pending: tuple[Image, Result, Render | None, tuple[int, int]] | None = None
        self.isolation: CpuIsolation | None = None

    # -- set-up ----------------------------------------------------------------------------------
    def prepare(self, strict: bool = True) -> None:
        """Load the model and build the source. ``strict`` raises on failure (CLI start);
        otherwise the error is kept and shown on the frames (the Lambda must come up anyway)."""
        try:
            self._model = self._model_factory(self.settings)
            self.stats.model_load_error = None
        except Exception as exc:
            if strict:
                raise
            self.stats.model_load_error = str(exc)
            log.error("model not loaded: %s", exc)
        try:
            self._source = self._source_factory(self.settings)
        except Exception as exc:
            if strict:
                raise
            self.stats.last_capture_error = str(exc)
            log.error("source not available: %s", exc)

    @property
    def model(self) -> Model | None:
        return self._model

    @property
    def source(self) -> FrameSource | None:
        return self._source

    # -- control ---------------------------------------------------------------------------------
    @property
    def state(self) -> LoopState:
        if self._thread is None or not self._thread.is_alive():
            return LoopState.STOPPED
        return LoopState.RUNNING if self._running.is_set() else LoopState.PAUSED

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._running.set()
            return
        if self._model is None and self._source is None:
            self.prepare(strict=False)
        self._stop = threading.Event()
        self._running.set()
        self.hub.reopen()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="inference-loop", daemon=True
        )
        self._thread.start()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._running.set()  # wake a paused loop so it can see the stop
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("inference loop still busy after %.1f s (a blocking model call?)", timeout)
        self._close_source()

    def close(self) -> None:
        self.stop()
        if self._pending_source is not None:
            self._pending_source.close()
            self._pending_source = None
        self.hub.close()

    def update(self, changes: dict[str, Any]) -> Settings:
        """Apply validated live settings (see config.validate_changes). Model and source changes
        load beside the running ones and swap only on success; a failure raises and changes
        nothing."""
        with self._switch_lock:
            new = self.settings.replace(**changes)
            # Load everything first and commit only when all succeeded: a PATCH that changes the
            # model and a broken source must leave both as they were.
            model = source = None
            # Their threads (a model's pool, a source's decoders) must not inherit the calling
            # serving thread's CPUs.
            with unconfined():
                if "model" in changes and changes["model"] != self.settings.model:
                    model = self._model_factory(new)
                if "source" in changes and changes["source"] != self.settings.source:
                    try:
                        source = self._source_factory(new)
                        source.open()
                    except Exception:
                        if source is not None:
                            source.close()
                        raise
            if model is not None:
                self._model = model
                self.stats.model_load_error = None
                log.info("model switched to %s", model.info.name)
            if source is not None:
                old, self._pending_source = self._pending_source, source
                if old is not None:
                    old.close()
                log.info("source switching to %s", source.name)
            if "jpeg_quality" in changes:
                self.hub.jpeg_quality = int(changes["jpeg_quality"])
            self.settings = new
            return new

    # -- the loop --------------------------------------------------------------------------------
    def _run(self, stop: threading.Event) -> None:
        log.info("inference loop started")
        self.stats.thread_id = native_thread_id()
        self._isolate()
        try:
            while not stop.is_set():
                if not self._running.is_set():
                    self._flush_pending()  # a paused loop shows its last result
                    self._running.wait(0.2)
                    continue
                try:
                    self._step(stop)
                except Exception as exc:  # the loop is the product: nothing may end it
                    self._rl(logging.ERROR, "unexpected error in the inference loop: %s", exc)
                    log.debug("loop error", exc_info=True)
                    self._flush_pending()
                    stop.wait(0.1)
                if self.isolation is not None:
                    self.isolation.check()
        finally:
            self._flush_pending()
            if self.isolation is not None:
                self.isolation.release()
        log.info("inference loop stopped")

    def _isolate(self) -> None:
        """Give this thread a CPU of its own when ``--loop-cpu`` asks for it (see affinity)."""
        cpus = available_cpus()
        model = self._model
        gpu_model = model is not None and "GPU=1" in model.info.backend
        cpu = choose_cpu(self.settings.loop_cpu, cpus, gpu_model=gpu_model)
        threads = getattr(model, "intra_op_threads", 1)
        if cpu is not None and self.settings.loop_cpu == "auto" and threads != 1:
            # The model's own threads would share the loop's one CPU or wait on it: a pinned
            # caller with ONNX Runtime's pool measured x0.38-0.53 of the model alone.
            log.info("inference loop not isolated: the model runs %s intra-op threads",
                     threads or "one per core")
            cpu = None
        if cpu is None or cpus is None:
            self.isolation = None
            return
        hub = self.hub
        self.isolation = CpuIsolation(cpu, cpus, watched=lambda: hub.total_encodes)
        self.isolation.apply()

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self.hub.publish(*pending)

    def _source_ready(self) -> bool:
        """True when the source has the next frame now (so the loop, not the source, waits)."""
        ready = getattr(self._source, "ready", None)
        if ready is None or self._pending_source is not None:
            return False
        try:
            return bool(ready())
        except Exception:
            return False

    def _swap_source(self) -> None:
        pending, self._pending_source = self._pending_source, None
        if pending is None:
            return
        self._flush_pending()
        self._close_source()
        self._source = pending
        self._source_open = True
        self.stats.consecutive_failures = 0

    def _close_source(self) -> None:
        if self._source is not None and self._source_open:
            try:
                self._source.close()
            except Exception:
                log.exception("closing the source failed")
        self._source_open = False

    def _read(self) -> tuple[Image | None, str]:
        source = self._source
        if source is None:
            self._source = source = self._source_factory(self.settings)
        if not self._source_open:
            source.open()
            self._source_open = True
            if self.isolation is not None:
                # Its grabber and decoder threads were started here, inheriting our one CPU:
                # give them every CPU back.
                self.isolation.check(force=True)
        frame = source.read()
        if frame is None:
            return None, f"no frame from {source.name}"
        return frame, ""

    def _step(self, stop: threading.Event) -> None:
        if self._pending_source is not None:
            self._swap_source()
        settings = self.settings
        t0 = time.perf_counter()
        try:
            frame, reason = self._read()
        except Exception as exc:
            frame, reason = None, str(exc) or type(exc).__name__
        if frame is None:
            self._on_capture_failure(reason, stop)
            return
        if self.stats.consecutive_failures:
            log.info("source back after %d failed reads", self.stats.consecutive_failures)
        self.stats.consecutive_failures = 0
        self.stats.last_capture_error = None
        timestamp = time.time()
        t_capture = time.perf_counter()
        self._process(frame, timestamp, settings, (t_capture - t0) * 1000.0)

    def _process(
        self, frame: Image, timestamp: float, settings: Settings, capture_ms: float
    ) -> None:
        timings = {"capture": capture_ms}
        model = self._model
        parsed: dict[str, Any] = {}
        items: tuple[Item, ...] = ()
        error: str | None = None
        h, w = frame.shape[:2]
        t = time.perf_counter()
        if model is not None:
            try:
                inputs = model.preprocess(frame)
                t1 = time.perf_counter()
                self._flush_pending()  # the previous frame's consumers run while we infer
                raw = model.infer(inputs)
                t2 = time.perf_counter()
                parsed = parse_first(model, raw, settings.top_k)
                items = select(parsed, model.info, settings.top_k, settings.threshold, (w, h))
                t3 = time.perf_counter()
                timings.update(
                    preprocess=(t1 - t) * 1000, inference=(t2 - t1) * 1000,
                    postprocess=(t3 - t2) * 1000,
                )
            except Exception as exc:
                self._flush_pending()
                self.stats.model_errors += 1
                error = f"model error: {exc}" if str(exc) else f"model error: {type(exc).__name__}"
                self.stats.last_model_error = error
                self._rl(logging.WARNING, "%s", error)
                parsed, items = {}, ()
        else:
            error = f"model not loaded: {self.stats.model_load_error or 'no model'}"

        dw, dh = target_size(w, h, settings.display_res)
        if dw > w:
            # Never upscale here: a viewer asking for more gets it from the hub's one encode.
            dw, dh = w, h
        now = time.monotonic()
        self._frame_times.append(now)
        fps = self._fps()
        render = self._renderer((w, h), (dw, dh), items, parsed, settings.overlay, fps,
                                timings.get("inference", 0.0), error)
        self._seq += 1
        result = Result(
            seq=self._seq, timestamp=timestamp, model=model.info if model else None,
            frame_size=(w, h), items=items, parsed=parsed, timings_ms=timings, fps=fps,
            error=error, top_k=settings.top_k, threshold=settings.threshold,
        )
        self._record(timings, fps, now)
        self._last_display_size = (dw, dh)
        publication = (frame, result, render, (dw, dh))
        self._flush_pending()
        ready = self._source_ready()
        if self.isolation is not None:
            self.isolation.note(ready)  # a loop that waits for its source lets go of its CPU
        if error is None and model is not None and ready:
            self._pending = publication
        else:
            self.hub.publish(*publication)

    def _renderer(
        self, size: tuple[int, int], display: tuple[int, int], items: tuple[Item, ...],
        parsed: dict[str, Any], draw: bool, fps: float, inference_ms: float, error: str | None,
    ) -> Render | None:
        """How the captured frame becomes the frame people see: resized to the display size,
        overlay drawn. The hub runs it for the first consumer only, so with nobody watching a
        frame costs neither."""
        (w, h), (dw, dh) = size, display
        if (dw, dh) == (w, h) and not draw:
            return None

        def render(frame: Image) -> Image:
            started = time.perf_counter()
            image = frame if (dw, dh) == (w, h) else cv2.resize(frame, (dw, dh))
            if draw:
                try:
                    shown = items if (dw, dh) == (w, h) else scale_items(items, dw / w, dh / h)
                    if "classification" in parsed:
                        overlay.draw_classification(image, shown)
                    elif "ssd" in parsed:
                        overlay.draw_boxes(image, shown)
                    elif "segmentation" in parsed:
                        overlay.draw_segmentation(image, parsed["segmentation"])
                    overlay.draw_status(image, fps, inference_ms, error)
                except Exception as exc:
                    # This runs on a consumer's thread (an encoder, the FIFO writer): a drawing
                    # bug must cost the overlay, not the frame, the stream or the FIFO reader.
                    self._rl(logging.WARNING, "overlay not drawn: %s", exc, key="overlay")
            self._record_stage("overlay", (time.perf_counter() - started) * 1000)
            return image

        return render

    def _fps(self) -> float:
        times = self._frame_times
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    def _record(self, timings: dict[str, float], fps: float, now: float) -> None:
        stats = self.stats
        stats.frames += 1
        stats.fps = fps
        stats.last_frame_time = time.time()
        for stage, ms in timings.items():
            self._record_stage(stage, ms)

    def _record_stage(self, stage: str, ms: float) -> None:
        # An average over ~20 frames: steady enough to read, quick to follow a change.
        stage_ms = self.stats.stage_ms
        stage_ms[stage] = stage_ms.get(stage, ms) * 0.95 + ms * 0.05

    def _on_capture_failure(self, reason: str, stop: threading.Event) -> None:
        stats = self.stats
        stats.capture_failures += 1
        stats.consecutive_failures += 1
        stats.last_capture_error = reason
        self._flush_pending()
        n = stats.consecutive_failures
        self._rl(logging.WARNING, "no frame (%s); retrying", reason)
        self._seq += 1
        self._frame_times.clear()
        frame = overlay.no_signal_frame(self._last_display_size, reason, n)
        result = Result(
            seq=self._seq, timestamp=time.time(),
            model=self._model.info if self._model else None, frame_size=self._last_display_size,
            error=f"no signal: {reason}", top_k=self.settings.top_k,
            threshold=self.settings.threshold,
        )
        self.stats.fps = 0.0
        self.hub.publish(frame, result)
        if n % REOPEN_AFTER_FAILURES == 0:
            # A camera or stream that keeps failing is often fixed by reopening it.
            self._close_source()
            stats.source_reopens += 1
        stop.wait(min(MAX_BACKOFF, 0.05 * 2 ** min(n, 6)))
