"""The model's CPU: a core of its own for the inference loop, and serving threads that yield to it.

Measured on 2 vCPUs (bench/README.md, section 1): with every output on, the loop lost most of its
frame time not to work but to sharing. The serving threads it wakes at each publish were placed on
its core and preempted it, and each time it blocked its core went to another task, so it came back
to cold caches. Two remedies, both on by default where they apply:

- **Isolation** (``--loop-cpu``): the loop thread is pinned to one CPU and every other thread of the
  process is kept off it, so our own threads never preempt the model. Other processes still may;
  they are not ours to move. Threads started later inherit their creator's mask, and the few that
  the loop thread itself creates (a video source's grabber and decoder threads, OpenCV's pool) are
  moved off by :meth:`CpuIsolation.check`, which the loop runs after opening a source and every
  few seconds.
- **Lower priority for serving threads** (``--serving-nice``): the JPEG encoders, the FIFO writer
  and the IoT publisher raise their own nice value, so when they and the loop want a CPU at once,
  the loop wins. The event-loop thread is left alone: a thread inherits its creator's nice value
  and can never lower it again, and it is the event loop that starts a new inference loop after
  ``POST /api/pipeline/start``.

Both are Linux calls; elsewhere they do nothing and say so in ``/api/stats``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable

log = logging.getLogger(__name__)

CHECK_INTERVAL = 3.0  # seconds between re-checks of the threads' masks (a few syscalls each)


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


# Loop threads pinned in this process (normally one; tests may run several): never moved by
# another loop's isolation.
_PINNED: set[int] = set()
_PINNED_LOCK = threading.Lock()


def _thread_ids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return []


class CpuIsolation:
    """Keeps the loop thread on ``cpu`` and every other thread of the process off it.

    Owned by the inference loop: :meth:`apply` on its thread at start, :meth:`check` from the
    same thread now and then, :meth:`release` when it stops (the other threads get every CPU
    back, so a stopped loop leaves no core unused).
    """

    def __init__(self, cpu: int, cpus: Iterable[int]) -> None:
        self.cpu = cpu
        self.cpus = frozenset(cpus)
        self.others = self.cpus - {cpu}
        self.loop_tid: int | None = None
        self.moved = 0  # threads whose mask we changed, over the run
        self.error: str | None = None
        self._next_check = 0.0

    @property
    def active(self) -> bool:
        return self.loop_tid is not None and self.error is None

    def apply(self) -> None:
        """Pin the calling thread (the loop) to :attr:`cpu`, the others off it."""
        self.loop_tid = threading.get_native_id()
        self.error = None
        self._set(self.loop_tid, frozenset({self.cpu}))
        if self.error is None:
            with _PINNED_LOCK:
                _PINNED.add(self.loop_tid)
            self.check(force=True)
            log.info("inference loop pinned to CPU %d; the process's other threads use %s",
                     self.cpu, ",".join(str(c) for c in sorted(self.others)))

    def check(self, force: bool = False) -> None:
        """Move any thread that has appeared on the loop's CPU off it (cheap; rate-limited)."""
        now = time.monotonic()
        if not self.active or (not force and now < self._next_check):
            return
        self._next_check = now + CHECK_INTERVAL
        with _PINNED_LOCK:
            pinned = set(_PINNED)
        for tid in _thread_ids():
            if tid == self.loop_tid or tid in pinned:
                continue
            try:
                current = os.sched_getaffinity(tid)
            except OSError:
                continue  # the thread ended meanwhile
            if self.cpu in current:
                self._set(tid, self.others)

    def release(self) -> None:
        """Every thread back on every CPU this process had (the loop thread is ending)."""
        if self.loop_tid is None:
            return
        with _PINNED_LOCK:
            _PINNED.discard(self.loop_tid)
            pinned = set(_PINNED)
        for tid in _thread_ids():
            if tid in pinned:
                continue
            try:
                if os.sched_getaffinity(tid) != self.cpus:
                    os.sched_setaffinity(tid, self.cpus)
            except OSError:
                continue
        self.loop_tid = None

    def _set(self, tid: int, cpus: frozenset[int]) -> None:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            return  # ended between the listing and now
        except OSError as exc:
            # A container or a policy that forbids it: run unpinned rather than not at all.
            self.error = f"cannot set CPU affinity: {exc.strerror or exc}"
            log.warning("inference loop not pinned: %s", self.error)
            return
        if tid != self.loop_tid:
            self.moved += 1

    def to_json(self) -> dict[str, object]:
        return {"cpu": self.cpu, "others": sorted(self.others), "active": self.active,
                "moved_threads": self.moved, "error": self.error}


def _nice_of(tid: int) -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except (AttributeError, OSError):
        return None


# The process's own nice value, read at import by the thread that imports us (the main thread,
# or Greengrass's): the serving threads are set relative to it, never to each other.
BASE_NICE = _nice_of(0) or 0


def lower_priority(nice: int) -> int | None:
    """Raise the calling thread's nice value to the process's + ``nice`` (Linux: per thread).

    Returns the thread's nice value after the call, or None where threads have no priority of
    their own. Never raises: a thread at the wrong priority still serves.
    """
    if nice <= 0:
        return _nice_of(threading.get_native_id())
    tid = threading.get_native_id()
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
