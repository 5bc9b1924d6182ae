"""The model's CPU: a core of its own for the inference loop, and serving threads that yield to it.

Measured on 2 vCPUs (bench/README.md, section 1): with every output on, the loop lost most of its
frame time not to work but to sharing. The serving threads it wakes at each publish were placed on
its core and preempted it, and each time it blocked, its core went to another task. Two remedies,
both on by default where they apply:

- **Isolation** (``--loop-cpu``): the loop thread is pinned to one CPU and the serving threads (the
  event loop, the JPEG encoders, the FIFO writer, the IoT publisher, paho's network thread; each
  registers itself with :func:`serving_thread`) are kept off it, so our own serving work never
  preempts the model. Every other thread keeps every CPU: the video decoder's threads, which hand
  the loop its frames, run best wherever the scheduler puts them (pinning them away measured a few
  per cent slower), and other processes are not ours to move. Threads the loop thread starts (a
  source's grabber and decoders, OpenCV's pool) inherit its one-CPU mask; :meth:`CpuIsolation.check`
  gives them every CPU back, right after a source opens and every few seconds.
  Isolation is only for a loop the model paces. The loop notes at every frame whether the next
  one was already waiting; a loop that mostly waits for its camera has room on its own CPU, and
  keeping the serving threads off it would only queue them on the others (measured: the 20-viewer
  p99 publish-to-viewer latency of a 30 fps camera went from 12 to 34 ms). So every few seconds
  :meth:`CpuIsolation.check` engages (>= 75 % of frames found the next one waiting: the serving
  threads kept off the loop's CPU) or lets go (<= 25 %: they may use it too), and in between stays
  as it was. Let go, the loop itself stays on its CPU while nobody watches (its caches stay warm:
  measured, the idle dashboard's CPU x1.002 of model-only pinned vs x1.074 unpinned) and may move
  while someone does, so that it can step aside for the stream (p99 capture-to-viewer at 20
  viewers 49.6 ms pinned vs 36.6 ms unpinned).
- **Lower priority for serving threads** (``--serving-nice``, default 10; its price: the encoders
  lag during viewer churn and more frames stay alive, bench/README.md fix 8): the serving threads
  but the event loop raise their own nice value, so when they and the loop want a CPU at once, the
  loop wins. The event-loop thread keeps the process's priority: a thread inherits its creator's
  nice value and can never lower it again, and it is the event loop that starts a new inference
  loop after ``POST /api/pipeline/start``.

Both are Linux calls; elsewhere they do nothing and ``/api/stats`` says so.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from inference.compat import native_thread_id

log = logging.getLogger(__name__)

CHECK_INTERVAL = 3.0  # seconds between re-checks of the threads' masks (a few syscalls each)
# The loop is "saturated" when the next frame is already waiting as it finishes one (the model,
# not the camera, sets the pace). Isolation engages at or above ENGAGE_AT of a check interval's
# frames and lets go at or below RELEASE_AT; in between it stays as it was.
ENGAGE_AT = 0.75
RELEASE_AT = 0.25
MIN_FRAMES = 5  # fewer frames in an interval say nothing either way


def available_cpus() -> frozenset[int] | None:
    """The CPUs this process may run on, or None where the OS cannot tell (not Linux)."""
    getter = getattr(os, "sched_getaffinity", None)
    if getter is None:
        return None
    try:
        return frozenset(getter(0))
    except OSError:
        return None


def parse_loop_cpu(value: object) -> str:
    """``auto`` | ``off`` | a CPU number this process may use; raises ValueError otherwise."""
    text = str(value).strip().lower()
    if text in ("auto", "off"):
        return text
    try:
        cpu = int(text)
    except ValueError:
        raise ValueError(f"expected auto, off or a CPU number, got {value!r}") from None
    cpus = available_cpus()
    if cpus is None:
        raise ValueError("pinning is not supported on this system; use auto or off")
    if cpu not in cpus:
        shown = ", ".join(str(c) for c in sorted(cpus))
        raise ValueError(f"CPU {cpu} is not available to this process (available: {shown})")
    return str(cpu)


def auto_threads(mode: str, cpus: frozenset[int] | None) -> int:
    """ONNX Runtime intra-op threads for ``--threads 0`` under ``--loop-cpu mode``.

    One CPU is left to the serving side: on 2 CPUs the model gets one thread, which ``auto``
    then isolates. ONNX Runtime's own default (one thread per core) with the loop pinned or with
    anything else running measured at x0.39-0.72 of the model alone (bench/README.md fix 12): its
    threads wait for each other, so one of them preempted stalls them all. 0 (ONNX Runtime's
    default) with ``--loop-cpu off`` or a single CPU, as before; 1 with ``--loop-cpu N``, which
    pins the loop whatever the thread count.
    """
    if mode == "off" or not cpus or len(cpus) < 2:
        return 0
    if mode != "auto":
        return 1  # the loop is pinned to the CPU asked for: a pool would share it (see above)
    return len(cpus) - 1


def choose_cpu(mode: str, cpus: frozenset[int] | None, gpu_model: bool = False) -> int | None:
    """The CPU the loop gets to itself under ``mode``, or None for no isolation.

    ``auto`` isolates when there are at least two CPUs, leaving the others to everything else,
    and not for a model that runs on the device's GPU: that loop mostly waits for the GPU, and
    the core it would hold idle is worth more to the serving threads.
    """
    if mode == "off" or not cpus or len(cpus) < 2:
        return None
    if mode == "auto":
        # The highest-numbered CPU: the first ones are where interrupts are usually handled.
        return None if gpu_model else max(cpus)
    cpu = int(mode)
    return cpu if cpu in cpus else None


# Loop threads pinned in this process (normally one; tests may run several) and the registered
# serving threads, by native thread id.
_LOCK = threading.Lock()
_PINNED: set[int] = set()
_SERVING: set[int] = set()
_ACTIVE: list[CpuIsolation] = []


def _thread_ids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return []


def _affinity(tid: int) -> frozenset[int] | None:
    try:
        return frozenset(os.sched_getaffinity(tid))
    except OSError:
        return None  # the thread ended meanwhile


def serving_thread(nice: int = 0) -> int | None:
    """Call at the start of a serving thread: it is kept off the loop's CPU while one is isolated
    and its nice value is raised by ``nice``. Returns its nice value (None where not supported)."""
    tid = native_thread_id()
    with _LOCK:
        _SERVING.add(tid)
        active = _ACTIVE[-1] if _ACTIVE else None
    if active is not None:
        active.place(tid)
    return lower_priority(nice)


class CpuIsolation:
    """Keeps the loop thread on ``cpu`` and the serving threads off it.

    Owned by the inference loop: :meth:`apply` on its thread at start, :meth:`check` from the
    same thread now and then, :meth:`release` when it stops (the serving threads get every CPU
    back, so a stopped loop leaves no core unused).
    """

    def __init__(self, cpu: int, cpus: Iterable[int],
                 watched: Callable[[], int] | None = None) -> None:
        self.cpu = cpu
        self.cpus = frozenset(cpus)
        self.others = self.cpus - {cpu}
        self.loop_tid: int | None = None
        self.moved = 0  # serving threads placed off the loop's CPU, over the run
        self.freed = 0  # threads started by the loop thread given every CPU back
        self.error: str | None = None
        # Engaged: the loop on its CPU, the serving threads off it. Not engaged (the loop waits
        # for its source, so its CPU has room): the serving threads on every CPU, and the loop
        # too while anyone watches (``watched``, a count of frames encoded for someone, grew
        # since the last check) so that it can step aside for them; with nobody watching it
        # stays on its CPU, where its caches are warm.
        self.engaged = False
        self.loop_pinned = False
        self._watched = watched
        self._last_watched = watched() if watched is not None else 0
        self.engagements = 0
        self.saturation: float | None = None  # the last interval's share of saturated frames
        self._frames = 0
        self._ready = 0
        self._next_check = 0.0

    @property
    def active(self) -> bool:
        return self.loop_tid is not None and self.error is None

    def note(self, ready: bool) -> None:
        """Called by the loop once a frame: was the next frame already waiting?"""
        self._frames += 1
        self._ready += ready

    def apply(self) -> None:
        """Pin the calling thread (the loop) to :attr:`cpu` and engage: a loop starts saturated
        until its frames say otherwise (an unpaced file or a slow model is, from frame one)."""
        self.loop_tid = native_thread_id()
        self.error = None
        if not self._set(self.loop_tid, frozenset({self.cpu})):
            return
        self.loop_pinned = True
        with _LOCK:
            _PINNED.add(self.loop_tid)
            _ACTIVE.append(self)
        self._engage()

    def _pin_loop(self, pinned: bool) -> None:
        if self.loop_tid is not None and pinned != self.loop_pinned:
            if self._set(self.loop_tid, frozenset({self.cpu}) if pinned else self.cpus):
                self.loop_pinned = pinned

    def _engage(self) -> None:
        self._pin_loop(True)
        self.engaged = True
        self.engagements += 1
        self.check(force=True)
        log.info("inference loop on CPU %d; the serving threads use %s", self.cpu,
                 ",".join(str(c) for c in sorted(self.others)))

    def _disengage(self) -> None:
        self.engaged = False
        with _LOCK:
            serving = set(_SERVING)
        self._free(serving)
        log.info("inference loop waits for its source: the serving threads use every CPU")

    def _free(self, tids: set[int]) -> None:
        for tid in tids:
            if _affinity(tid) not in (None, self.cpus):
                self._set(tid, self.cpus)

    def place(self, tid: int) -> None:
        """Keep serving thread ``tid`` off the loop's CPU while engaged."""
        if self.active and self.engaged and _affinity(tid) not in (None, self.others):
            if self._set(tid, self.others):
                self.moved += 1

    def check(self, force: bool = False) -> None:
        """Engage or let go as the loop's saturation asks; while engaged, serving threads off
        the loop's CPU and threads that inherited its one-CPU mask (started by the loop thread)
        back on every CPU. Cheap, and rate-limited."""
        now = time.monotonic()
        if not self.active or (not force and now < self._next_check):
            return
        self._next_check = now + CHECK_INTERVAL
        if self._frames >= MIN_FRAMES:
            self.saturation = self._ready / self._frames
            self._frames = self._ready = 0
            if self.engaged and self.saturation <= RELEASE_AT:
                self._disengage()
            elif not self.engaged and self.saturation >= ENGAGE_AT:
                self._engage()  # checks the threads itself
                return
        if self._watched is not None:
            count = self._watched()
            watched, self._last_watched = count > self._last_watched, count
        else:
            watched = True
        if not self.engaged:
            self._pin_loop(not watched)
        live = set(_thread_ids())
        with _LOCK:
            if live:  # an unreadable /proc says nothing about which threads ended
                _SERVING.intersection_update(live)  # forget threads that have ended
            serving, pinned = set(_SERVING), set(_PINNED)
        for tid in live:
            if tid == self.loop_tid or tid in pinned:
                continue
            if tid in serving:
                self.place(tid)
            elif _affinity(tid) == frozenset({self.cpu}):
                if self._set(tid, self.cpus):
                    self.freed += 1

    def release(self) -> None:
        """Serving threads back on every CPU this process had (the loop thread is ending)."""
        if self.loop_tid is None:
            return
        with _LOCK:
            _PINNED.discard(self.loop_tid)
            if self in _ACTIVE:
                _ACTIVE.remove(self)
            serving = set(_SERVING)
            still_active = bool(_ACTIVE)
        if not still_active:
            self._free(serving)
        self.loop_tid = None
        self.engaged = self.loop_pinned = False

    def _set(self, tid: int, cpus: frozenset[int]) -> bool:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            return False  # ended between the listing and now
        except OSError as exc:
            # A container or a policy that forbids it: run unpinned rather than not at all.
            self.error = f"cannot set CPU affinity: {exc.strerror or exc}"
            log.warning("inference loop not pinned: %s", self.error)
            return False
        return True

    def to_json(self) -> dict[str, object]:
        return {"cpu": self.cpu, "serving_cpus": sorted(self.others), "active": self.active,
                "engaged": self.engaged, "loop_pinned": self.loop_pinned,
                "engagements": self.engagements,
                "saturation": None if self.saturation is None else round(self.saturation, 3),
                "serving_threads_moved": self.moved, "threads_freed": self.freed,
                "error": self.error}


def _nice_of(tid: int) -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except (AttributeError, OSError):
        return None


# The process's own nice value, read at import by the thread that imports us (the main thread,
# or Greengrass's): the serving threads are set relative to it, never to each other.
BASE_NICE = _nice_of(0) or 0


@contextmanager
def unconfined() -> Iterator[None]:
    """Run the block on every CPU of the active isolation, then restore the calling thread's mask.

    A thread inherits its creator's mask. A model or a source loaded on a serving thread (a live
    settings change runs on the event loop's worker thread) would start its threads (ONNX
    Runtime's pool, a video source's decoders) confined to the serving CPUs, which
    :meth:`CpuIsolation.check` does not undo: they are neither serving threads nor on the loop's
    CPU. Loading inside this block starts them with every CPU, as at start-up.
    """
    with _LOCK:
        active = _ACTIVE[-1] if _ACTIVE else None
    tid = native_thread_id()
    before = _affinity(tid) if active is not None else None
    widened = False
    if active is not None and before is not None and before != active.cpus:
        try:
            os.sched_setaffinity(tid, active.cpus)
            widened = True
        except OSError:
            pass  # confined it stays: slower threads, not a failed change
    try:
        yield
    finally:
        if widened and before is not None:
            try:
                os.sched_setaffinity(tid, before)
            except OSError:
                pass


def lower_priority(nice: int) -> int | None:
    """Raise the calling thread's nice value to the process's + ``nice`` (Linux: per thread).

    Returns the thread's nice value after the call, or None where threads have no priority of
    their own. Never raises: a thread at the wrong priority still serves.
    """
    if nice <= 0:
        return _nice_of(native_thread_id())
    tid = native_thread_id()
    current = _nice_of(tid)
    if current is None:
        return None
    target = min(19, BASE_NICE + nice)
    if current >= target:
        return current
    try:
        os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError as exc:
        log.debug("nice %d not set on thread %d: %s", target, tid, exc)
        return current
    return target
