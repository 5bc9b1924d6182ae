"""The recorder: a pre-roll of frames always kept, and each event's snapshots and clip written.

A hub listener only keeps each result and wakes the named thread ``recorder`` (a serving
thread: off the loop's CPU, at a lower priority); the thread feeds every result to the
:class:`~inference.events.tracker.Tracker`, takes the newest frame and keeps its JPEG at the
display resolution (the one viewers of the page share, :meth:`FrameHub.encode`) at
``--record-fps`` in a ring of ``--pre-roll`` seconds. An event start writes the ring into a new
clip and the frames that follow until its end; the clip keeps wall-clock time (a frame is
repeated when the loop is slower than ``--record-fps``). The best frame of an event is kept
twice: as shown (overlay) and clean.

The loop never waits for any of it. A slow disk makes the recorder skip pictures, not results:
events still start and end at the right ones. Each clip is fed by its own thread
(:class:`~inference.events.clip.QueuedClip`), so an encoder starved of CPU costs frames of the
clip, not the recorder's time, except at an event's end while it finishes its (bounded) backlog.
A full disk (or a store that fails) stops recording with a ``/health`` reason and retries now
and then; the loop and everything else go on.
"""

from __future__ import annotations

import collections
import errno
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import cv2

from inference.events.clip import ClipError, QueuedClip, clip_kind, open_clip
from inference.events.rules import Rule, parse_rule
from inference.events.store import EventStore, StoreError, default_data_dir
from inference.events.tracker import Box, Tracker, Transition
from inference.pipeline.frames import Frame, FrameHub, target_size
from inference.result import Item
from inference.settings import Settings
from inference.workers import Worker

log = logging.getLogger(__name__)

RING_MAX_BYTES = 64 * 1024 * 1024  # the pre-roll's hard cap, whatever the settings
MIN_FREE_BYTES = 64 * 1024 * 1024  # no new event below this much free space
TOUCH_SECONDS = 1.0  # how often an open event's row says it is alive (its end after a crash)
SNAPSHOT_SECONDS = 1.0  # a better frame rewrites the snapshots at most this often
PRUNE_SECONDS = 600.0
RETRY_SECONDS = 30.0  # after a fault, the next try
RESULTS_KEPT = 1024  # results the thread has yet to look at (a minute at 15 fps): small, no pictures
IDLE_FEED_SECONDS = 1.0  # without frames, time still passes for the tracker (events end)
NOTICE_UPDATE_SECONDS = 1.0

Listener = Callable[[str, Dict[str, Any]], None]
_Seen = Tuple[int, float, Sequence[Item]]  # a result as the tracker needs it: seq, time, items


@dataclass
class RecordOptions:
    rules: List[Rule]
    res: str = "720p"
    fps: float = 10.0
    pre_roll: float = 5.0
    post_roll: float = 5.0
    debounce: int = 3
    max_length: float = 300.0
    cooldown: float = 5.0
    retain_days: float = 30.0
    retain_mb: float = 1024.0
    jpeg_quality: int = 80


def options_from(settings: Settings) -> RecordOptions:
    return RecordOptions(
        rules=[parse_rule(text) for text in settings.record], res=settings.display_res,
        fps=settings.record_fps, pre_roll=settings.pre_roll, post_roll=settings.post_roll,
        debounce=settings.record_debounce, max_length=settings.record_max,
        cooldown=settings.record_cooldown, retain_days=settings.retain_days,
        retain_mb=settings.retain_mb, jpeg_quality=settings.jpeg_quality)


@dataclass
class _Best:
    prob: float
    at: float
    box: Box
    jpeg: bytes
    frame: Frame


class _Open:
    """An event being recorded."""

    def __init__(self, event_id: int, label: str, start: float,
                 clip: Optional[QueuedClip], fps: float) -> None:
        self.id, self.label, self.start, self.clip, self.fps = event_id, label, start, clip, fps
        self.t0: Optional[float] = None
        self.written = 0
        self._last: Optional[bytes] = None
        self.best: Optional[_Best] = None
        self.snapshot_at = 0.0
        self.notice_at = 0.0
        self.before: Optional[Dict[str, Any]] = None

    def write(self, at: float, jpeg: bytes) -> None:
        """``jpeg`` is the picture from ``at`` on: the one before fills the clip up to ``at``."""
        if self.clip is None:
            return
        if self.t0 is None:
            self.t0 = at
        self._fill(at)
        self._last = jpeg

    def finish(self, at: float) -> None:
        """The last picture fills the clip up to the end, ``at``."""
        if self.clip is not None and self.t0 is not None:
            self._fill(at)

    def _fill(self, until: float) -> None:
        # The clip keeps wall-clock time at its own fps: a picture is repeated for as long as it
        # was shown (a loop slower than the clip's fps), never more than 5 s of copies.
        assert self.clip is not None and self.t0 is not None
        if self._last is None:
            return
        due = int(round((until - self.t0) * self.fps)) - self.written
        for _ in range(min(due, int(self.fps * 5))):
            self.clip.write(self._last)
            self.written += 1


class Recorder(Worker):
    """An output (:class:`inference.outputs.base.Output`) named ``events``."""

    name = "events"
    thread_name = "recorder"
    serving = True

    @classmethod
    def build(cls, settings: Settings, hub: FrameHub) -> Recorder:
        """The recorder the settings ask for, its store open; OutputError naming --data-dir when
        the folder cannot hold it."""
        from inference.outputs.base import OutputError

        store = EventStore(Path(settings.data_dir) if settings.data_dir else default_data_dir())
        try:
            store.open()
        except StoreError as exc:
            raise OutputError("--data-dir", str(exc)) from None
        recorder = cls(options_from(settings), hub, store)
        recorder.nice = settings.serving_nice
        return recorder

    def __init__(self, options: RecordOptions, hub: FrameHub, store: EventStore) -> None:
        super().__init__()
        self.options = options
        self.hub = hub
        self.store = store
        self.tracker = Tracker(options.rules, options.debounce, options.post_roll,
                               options.max_length, options.cooldown)
        self.listeners: List[Listener] = []
        self.fault: Optional[str] = None
        self.events_started = 0
        self.frames_buffered = 0
        self.clip_frames_dropped = 0  # by an encoder too slow for the clips' frame rate
        self._fault_at = 0.0
        self._wake = threading.Event()
        self._ring: Deque[Tuple[float, bytes]] = collections.deque()
        self._results: Deque[_Seen] = collections.deque(maxlen=RESULTS_KEPT)
        self._ring_bytes = 0
        self._open: Dict[str, _Open] = {}
        self._last_buffered = float("-inf")
        self._last_at: Optional[float] = None
        self._frame_interval = 0.1  # the loop's, smoothed: how far back the debounce reaches
        self._lock = threading.Lock()  # the open events, read by stats() from other threads

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self.alive:
            return
        self.store.open()
        self.hub.add_listener(self._on_publish)
        super().start()

    def stop(self, deadline: float) -> bool:
        self.hub.remove_listener(self._on_publish)
        self.signal_stop()
        self._wake.set()
        stopped = self.join(deadline)
        if stopped:  # else its thread still writes: the store stays open for it
            self.store.close()
        return stopped

    def apply(self, settings: Settings) -> None:
        # the clip follows what the page shows: the display resolution may change live
        self.options.res = settings.display_res
        self.options.jpeg_quality = settings.jpeg_quality

    def _on_publish(self, seq: int) -> None:
        # On the loop's thread: a wake-up, and the result kept (not its picture) so the tracker
        # sees every one even while this thread is busy with a slow disk or encoder; otherwise
        # a debounce would count results seconds apart as consecutive, and an end come late.
        frame = self.hub.latest()
        if frame is not None and frame.seq == seq:
            result = frame.result  # only what the tracker reads: a segmentation map is megabytes
            self._results.append((seq, result.timestamp, () if result.error else result.items))
        self._wake.set()

    def run(self) -> None:
        last_seq = 0
        last_fed = time.time()
        touched = pruned = 0.0
        try:
            self._prune()
            pruned = time.monotonic()
            while not self.stopping.is_set():
                self._wake.wait(0.5)
                self._wake.clear()
                frame = self.hub.latest()
                now = time.time()
                missed = self._take_results()
                if frame is not None and frame.seq != last_seq:
                    for seq, at, items in missed:
                        if last_seq < seq < frame.seq:
                            self._track(at, items, frame)
                    last_seq = frame.seq
                    last_fed = now
                    self._process(frame)
                elif now - last_fed >= IDLE_FEED_SECONDS:
                    last_fed = now
                    self._handle(self.tracker.feed(now, ()), None)
                mono = time.monotonic()
                if mono - touched >= TOUCH_SECONDS:
                    touched = mono
                    self._touch()
                if mono - pruned >= PRUNE_SECONDS:
                    pruned = mono
                    self._prune()
        finally:
            self._handle(self.tracker.end_all(time.time()), None)

    # -- per frame -------------------------------------------------------------------------------
    def _take_results(self) -> List[_Seen]:
        taken = []
        while self._results:
            taken.append(self._results.popleft())
        return taken

    def _track(self, at: float, items: Sequence[Item], newest: Frame) -> None:
        """A result whose frame was gone by the time this thread looked: the tracker sees it,
        an event it starts takes its snapshot from the newest frame, and its clip repeats the
        picture before (the clip keeps time, not every picture)."""
        transitions = self.tracker.feed(at, items)
        self._handle([t for t in transitions if t.kind == "end"], None)
        self._handle([t for t in transitions if t.kind == "start"], newest)

    def _process(self, frame: Frame) -> None:
        result = frame.result
        at = result.timestamp
        if self._last_at is not None and at > self._last_at:
            self._frame_interval += 0.1 * (min(at - self._last_at, 5.0) - self._frame_interval)
        self._last_at = at
        items = () if result.error else result.items
        transitions = self.tracker.feed(at, items)
        jpeg: Optional[bytes] = None
        if at - self._last_buffered >= 0.999 / self.options.fps:
            jpeg = self._jpeg(frame)
            if jpeg is not None:
                self._last_buffered = at
        ends = [t for t in transitions if t.kind == "end"]
        self._handle(ends, frame)
        if jpeg is not None:
            for event in list(self._open.values()):
                self._write(event, at, jpeg)
            self._buffer(at, jpeg)
        self._handle([t for t in transitions if t.kind != "end"], frame)

    def _jpeg(self, frame: Frame) -> Optional[bytes]:
        try:
            done = self.hub.encode(self.options.res, frame)
        except Exception:
            log.exception("encoding a frame for the recording failed")
            return None
        return done.jpeg(self.options.res) if done is not None else None

    def _buffer(self, at: float, jpeg: bytes) -> None:
        ring = self._ring
        ring.append((at, jpeg))
        self._ring_bytes += len(jpeg)
        self.frames_buffered += 1
        # An event starts at the first of its debounce results, which came that many frames ago:
        # the ring reaches back that far beyond the pre-roll, so the clip starts on time.
        margin = self.options.debounce * self._frame_interval + 1.0 / self.options.fps
        keep_from = at - self.options.pre_roll - margin
        while ring and (ring[0][0] < keep_from or self._ring_bytes > RING_MAX_BYTES):
            self._ring_bytes -= len(ring.popleft()[1])

    def _write(self, event: _Open, at: float, jpeg: bytes) -> None:
        try:
            event.write(at, jpeg)
        except (ClipError, OSError) as exc:
            self._set_fault(f"clip of event {event.id}: {exc}", exc)
            self._close_clip(event)

    # -- transitions -----------------------------------------------------------------------------
    def _handle(self, transitions: List[Transition], frame: Optional[Frame]) -> None:
        for t in transitions:
            try:
                if t.kind == "start":
                    self._start(t, frame)
                elif t.kind == "update":
                    self._update(t, frame)
                elif t.kind == "end":
                    self._end(t)
            except StoreError as exc:
                self._set_fault(f"event store: {exc}", exc)
            except OSError as exc:
                self._set_fault(f"event files: {exc}", exc)

    def _start(self, t: Transition, frame: Optional[Frame]) -> None:
        if not self._may_record():
            return
        source = None
        if frame is not None and frame.result.origin is not None:
            source = frame.result.origin.to_json()
        kind = clip_kind()
        model = frame.result.model.name if frame is not None and frame.result.model else ""
        event_id = self.store.create(t.label, t.at, t.prob, t.box, model, source, kind)
        clip: Optional[QueuedClip] = None
        try:
            clip = open_clip(self.store.clip_part(event_id), self.store.clip_path(event_id),
                             self.options.fps)
        except ClipError as exc:
            self._set_fault(f"clip of event {event_id}: {exc}", exc)
        event = _Open(event_id, t.label, t.at, clip, self.options.fps)
        with self._lock:
            self._open[t.label] = event
        self.events_started += 1
        # The pre-roll: from what was shown at (start - pre-roll), if the ring goes back that far.
        begin = t.at - self.options.pre_roll
        frames = list(self._ring)
        older = [i for i, (at, _) in enumerate(frames) if at <= begin]
        for i, (at, jpeg) in enumerate(frames[older[-1] if older else 0:]):
            self._write(event, max(at, begin) if i == 0 else at, jpeg)
        if frame is not None:
            self._best(event, t.prob, frame.result.timestamp, t.box, frame, force=True)
        log.info("event %d: %s started (%.0f%%)", event_id, t.label, t.prob * 100)
        self._notify("new", event)

    def _update(self, t: Transition, frame: Optional[Frame]) -> None:
        event = self._open.get(t.label)
        if event is None or frame is None:
            return
        self._best(event, t.prob, t.at, t.box, frame)
        now = time.monotonic()
        if now - event.notice_at >= NOTICE_UPDATE_SECONDS:
            self._notify("update", event)

    def _end(self, t: Transition) -> None:
        with self._lock:
            event = self._open.pop(t.label, None)
        if event is None:
            return
        self._write_snapshots(event)
        try:
            event.finish(t.at)
        except (ClipError, OSError) as exc:
            self._set_fault(f"clip of event {event.id}: {exc}", exc)
        self._close_clip(event)
        self.store.finish(event.id, t.at, t.reason)
        log.info("event %d: %s ended (%s)", event.id, t.label, t.reason)
        self._notify("end", event)
        if t.reason != "stopped":
            self._prune()

    def _close_clip(self, event: _Open) -> None:
        clip, event.clip = event.clip, None
        if clip is None:
            return
        if not clip.close():
            log.warning("event %d has no playable clip", event.id)
        self.clip_frames_dropped += clip.dropped

    # -- snapshots -------------------------------------------------------------------------------
    def _best(self, event: _Open, prob: float, at: float, box: Box, frame: Frame,
              force: bool = False) -> None:
        if event.best is not None and prob <= event.best.prob and not force:
            return
        jpeg = self._jpeg(frame)
        if jpeg is None:
            return
        event.best = _Best(prob, at, box, jpeg, frame)
        self.store.touch(event.id, prob, box, at)
        now = time.monotonic()
        if force or now - event.snapshot_at >= SNAPSHOT_SECONDS:
            self._write_snapshots(event)

    def _write_snapshots(self, event: _Open) -> None:
        best = event.best
        if best is None:
            return
        event.snapshot_at = time.monotonic()
        _write_file(self.store.snapshot_path(event.id), best.jpeg)
        clean = _clean_jpeg(best.frame, self.options.res, self.options.jpeg_quality)
        if clean is not None:
            _write_file(self.store.snapshot_path(event.id, clean=True), clean)

    # -- upkeep ----------------------------------------------------------------------------------
    def _touch(self) -> None:
        for event in list(self._open.values()):
            try:
                self.store.touch(event.id)
            except StoreError as exc:
                self._set_fault(f"event store: {exc}", exc)

    def _prune(self) -> None:
        try:
            self.store.prune(self.options.retain_days, self.options.retain_mb)
        except (StoreError, OSError) as exc:
            log.warning("retention failed: %s", exc)

    def _may_record(self) -> bool:
        if self.fault is not None and time.monotonic() - self._fault_at < RETRY_SECONDS:
            return False
        try:
            free = shutil.disk_usage(str(self.store.dir)).free
        except OSError as exc:
            self._set_fault(f"cannot read the free space of {self.store.dir}: {exc}", exc)
            return False
        if free < MIN_FREE_BYTES:
            self._prune()
            free = shutil.disk_usage(str(self.store.dir)).free
        if free < MIN_FREE_BYTES:
            self._set_fault(f"disk full: {free // (1024 * 1024)} MB free in {self.store.dir}, "
                            f"{MIN_FREE_BYTES // (1024 * 1024)} MB needed", None)
            return False
        if self.fault is not None:
            log.info("recording again (%s is over)", self.fault)
        self.fault = None
        return True

    def _set_fault(self, reason: str, exc: Optional[BaseException]) -> None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            reason = f"disk full in {self.store.dir}: {exc}"
        if self.fault != reason:
            log.error("recording stopped: %s", reason)
        self.fault = reason
        self._fault_at = time.monotonic()

    # -- what others see -------------------------------------------------------------------------
    def _notify(self, kind: str, event: _Open) -> None:
        record = self.store.get(event.id)
        if record is None:
            return
        after = record.to_json()
        payload = {"type": kind, "before": event.before, "after": after}
        event.before = after
        event.notice_at = time.monotonic()
        for listener in list(self.listeners):
            try:
                listener(kind, payload)
            except Exception:
                log.exception("event listener failed")

    def health(self) -> Tuple[bool, str]:
        if self.fault is not None:
            return False, f"recording stopped: {self.fault}"
        with self._lock:
            active = len(self._open)
        return True, f"{active} event(s) in progress" if active else "watching"

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            active = [e.id for e in self._open.values()]
        return {"rules": [str(r) for r in self.options.rules], "in_progress": active,
                "started": self.events_started, "clip_kind": clip_kind(),
                "pre_roll_frames": len(self._ring), "pre_roll_bytes": self._ring_bytes,
                "clip_frames_dropped": self.clip_frames_dropped,
                "fault": self.fault}


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        out.write(data)
    tmp.replace(path)


def _clean_jpeg(frame: Frame, res: str, quality: int) -> Optional[bytes]:
    """The frame as captured (no overlay), at the size the overlaid one is shown at."""
    raw = frame.raw
    tw, th = target_size(frame.size[0], frame.size[1], frame.effective_res(res))
    h, w = raw.shape[:2]
    image = cv2.resize(raw, (tw, th), interpolation=cv2.INTER_AREA) if (tw, th) != (w, h) else raw
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return bytes(buf.tobytes()) if ok else None
