"""The service: the product's parts and their lifecycle, with one owner.

The frame hub, the inference loop, its capture and model, and the outputs (FIFO, IoT) are built
from the settings here and started and stopped here, by the CLI, the Greengrass Lambda and the
tests alike. Start, stop, pause, resume and the swap of a live change are serialised by one lock,
so two clients pressing buttons at once cannot interleave them (nor release a camera another
thread reads). A live change of model or source loads the new one beside the running one, outside
that lock (a model takes seconds, a file opens with FFmpeg's timeout: Stop and Pause never wait
for it; only another change does), and swaps only when everything loaded; a failure raises and
changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Tuple

from inference.affinity import unconfined
from inference.outputs import build_outputs
from inference.outputs.base import Output
from inference.pipeline.frames import FrameHub
from inference.pipeline.loop import InferenceLoop, LoopState
from inference.settings import Settings
from inference.sources.capture import Capture
from inference.types import FrameSource, Model

if TYPE_CHECKING:
    from inference.events.recorder import Recorder
    from inference.events.store import EventStore
    from inference.outputs.fifo import FifoWriter
    from inference.outputs.iot import IotOutput

log = logging.getLogger(__name__)

STOP_SECONDS = 2.0

SourceFactory = Callable[[Settings], FrameSource]
ModelFactory = Callable[[Settings], Model]
# Told "config" after a live change and "state" after the pipeline's state changed.
ChangeListener = Callable[[str], None]


class PipelineActionError(ValueError):
    """A pipeline action that cannot lead to its state from the current one."""

    def __init__(self, action: str, state: LoopState) -> None:
        super().__init__(f"cannot {action}: the pipeline is {state.value}; start it first")
        self.action = action
        self.state = state


def default_source_factory(settings: Settings) -> FrameSource:
    from inference.sources import default_source, make_source

    return make_source(settings.source or default_source(), fps=settings.source_fps,
                       interval=settings.slide_interval, schemes=settings.source_schemes)


def default_model_factory(settings: Settings) -> Model:
    from inference.models import load_model

    return load_model(settings)


class ServiceStopped(RuntimeError):
    """A live change that finished loading after the service was stopped (shutdown)."""


def _discard(model: Optional[Model], source: Optional[FrameSource]) -> None:
    for part in (model, source):
        if part is not None:
            try:
                part.close()
            except Exception:
                log.exception("closing an unused %s failed", type(part).__name__)


class Service:
    def __init__(
        self,
        settings: Settings,
        source_factory: SourceFactory = default_source_factory,
        model_factory: ModelFactory = default_model_factory,
        outputs: Optional[List[Output]] = None,
    ) -> None:
        self._settings = settings
        self._source_factory = source_factory
        self._model_factory = model_factory
        self.hub = FrameHub(settings.jpeg_quality)
        self.capture = Capture(lambda: self._source_factory(self._settings))
        self.loop = InferenceLoop(settings, self.hub, self.capture)
        self.outputs: List[Output] = list(outputs or [])
        self._lock = threading.RLock()
        self._apply_lock = threading.Lock()  # one live change at a time, its loading included
        self._stopped = False
        self._history: Optional[EventStore] = None
        self._history_lock = threading.Lock()
        self._listeners: List[ChangeListener] = []
        self._prepared = False
        self.started = False

    @classmethod
    def build(cls, settings: Settings) -> Service:
        """The loop plus the outputs the settings ask for; raises OutputError naming the option."""
        service = cls(settings)
        service.outputs = build_outputs(settings, service.hub)
        return service

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def state(self) -> LoopState:
        return self.loop.state

    @property
    def iot(self) -> Optional[IotOutput]:
        from inference.outputs.iot import IotOutput

        found = [o for o in self.outputs if isinstance(o, IotOutput)]
        return found[0] if found else None

    @property
    def fifo(self) -> Optional[FifoWriter]:
        from inference.outputs.fifo import FifoWriter

        found = [o for o in self.outputs if isinstance(o, FifoWriter)]
        return found[0] if found else None

    @property
    def recorder(self) -> Optional[Recorder]:
        from inference.events.recorder import Recorder

        found = [o for o in self.outputs if isinstance(o, Recorder)]
        return found[0] if found else None

    def event_store(self) -> Optional[EventStore]:
        """The recorder's store; with recording off, the history an earlier run left in
        ``--data-dir`` (None if there is none)."""
        recorder = self.recorder
        if recorder is not None:
            return recorder.store
        with self._history_lock:
            if self._history is None:
                from inference.events.store import EventStore, default_data_dir

                folder = Path(self._settings.data_dir) if self._settings.data_dir else default_data_dir()
                if (folder / "events.db").is_file():
                    store = EventStore(folder)
                    try:
                        store.open()
                    except Exception as exc:
                        log.warning("the event history in %s cannot be read: %s", folder, exc)
                        return None
                    self._history = store
            return self._history

    def add_output(self, output: Output) -> None:
        self.outputs.append(output)

    def add_listener(self, listener: ChangeListener) -> None:
        """``listener`` is called on the changing thread, under the service's lock: it must not
        block or call back into the service."""
        self._listeners.append(listener)

    def remove_listener(self, listener: ChangeListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _changed(self, what: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(what)
            except Exception:
                log.exception("change listener failed")

    # -- lifecycle -------------------------------------------------------------------------------
    def prepare(self, strict: bool = True) -> None:
        """Load the model and build the source. ``strict`` raises (the CLI exits naming the
        option); otherwise the error is kept and shown on every frame (the Lambda comes up
        anyway)."""
        with self._lock:
            self._prepared = True
            try:
                self.loop.swap(model=self._model_factory(self._settings))
            except Exception as exc:
                if strict:
                    raise
                self.loop.stats.model_load_error = str(exc)
                log.error("model not loaded: %s", exc)
            try:
                self.capture.source = self._source_factory(self._settings)
            except Exception as exc:
                if strict:
                    raise
                self.capture.last_error = str(exc)
                log.error("source not available: %s", exc)

    def start(self) -> None:
        with self._lock:
            self._stopped = False
            if not self._prepared:
                self.prepare(strict=False)
            self.hub.reopen()
            self.loop.start()
            if not self.started:
                for output in self.outputs:
                    output.start()
                self.started = True

    def stop(self, deadline: Optional[float] = None) -> None:
        """Stop everything by ``deadline`` (``time.monotonic()``; default in STOP_SECONDS): the
        loop first, so the outputs see no new work while they deliver what they hold."""
        deadline = time.monotonic() + STOP_SECONDS if deadline is None else deadline
        with self._lock:
            self._stopped = True
            self.loop.stop(deadline)
            self.hub.close()
            if self.started:
                self.started = False
                for output in reversed(self.outputs):
                    try:
                        output.stop(deadline)
                    except Exception:
                        log.exception("stopping output %s failed", output.name)
            self.loop.close()
        with self._history_lock:
            if self._history is not None:
                self._history.close()
                self._history = None

    def pipeline(self, action: str) -> LoopState:
        """``start``, ``stop``, ``pause`` or ``resume`` the loop (the outputs keep serving).

        Stop ends the loop and closes the source (a camera is free for others; start opens it
        again); the model stays loaded. Pause keeps both open and stops reading and inferring.
        An action whose state is already reached changes nothing; pause or resume a stopped
        pipeline raises PipelineActionError (nothing is there to pause or resume)."""
        with self._lock:
            before = self.loop.state
            if action in ("pause", "resume") and before is LoopState.STOPPED:
                raise PipelineActionError(action, before)
            if action == "start":
                self.hub.reopen()
                self.loop.start()
            elif action == "stop":
                if self.loop.stop(time.monotonic() + STOP_SECONDS):
                    self.capture.close()
            elif action == "pause":
                self.loop.pause()
            elif action == "resume":
                self.loop.resume()
            else:
                raise ValueError(f"unknown pipeline action {action!r}")
            if self.loop.state is not before:
                self._changed("state")
            return self.loop.state

    # -- live changes ----------------------------------------------------------------------------
    def apply(self, changes: Mapping[str, Any]) -> Settings:
        """Validate and apply live settings; raises ConfigError, ModelError or SourceError (and
        nothing changes) when one cannot be used."""
        with self._apply_lock:
            new = self._settings.changed(changes)
            model, source, opened = self._load_beside(new, changes)
            with self._lock:
                if self._stopped:
                    _discard(model, source)
                    raise ServiceStopped("the dashboard is stopping; the change was not applied")
                return self._swap(new, model, source, opened)

    def _swap(self, new: Settings, model: Optional[Model], source: Optional[FrameSource],
              opened: bool) -> Settings:
        """Take the loaded change; the caller holds the lock."""
        self.hub.jpeg_quality = new.jpeg_quality
        self._settings = new
        self.loop.settings = new  # before the swap: a new model never runs on old settings
        self.loop.swap(model=model, source=source, source_open=opened)
        if model is not None:
            log.info("model switched to %s", model.info.name)
        if source is not None:
            log.info("source switching to %s", source.name)
        for output in self.outputs:
            output.apply(new)
        self._changed("config")
        return new

    def _load_beside(self, new: Settings, changes: Mapping[str, Any]
                     ) -> Tuple[Optional[Model], Optional[FrameSource], bool]:
        """The new model and the new source ``changes`` ask for, or None each, and whether the
        source is open; either fails and nothing is kept.

        A file or images are opened here, so one that cannot be read is refused as at start. A
        camera or stream is not: as at start, one that is down is taken and retried by the loop
        (with NO SIGNAL meanwhile), and a slow one (RTSP takes seconds) never holds the request
        and the control lock while it connects."""
        model: Optional[Model] = None
        source: Optional[FrameSource] = None
        opened = True
        # Their threads (a model's pool, a source's decoders) must not inherit the calling
        # serving thread's CPUs.
        with unconfined():
            if "model" in changes and new.model != self._settings.model:
                model = self._model_factory(new)
            if "source" in changes and new.source != self._settings.source:
                try:
                    source = self._source_factory(new)
                    if getattr(source, "live", False):
                        opened = False
                    else:
                        source.open()
                except Exception:
                    if source is not None:
                        source.close()
                    if model is not None:
                        model.close()
                    raise
        return model, source, opened
