"""Named background threads with one way to start and stop them.

Every thread of the product (the inference loop, the FIFO writer, the IoT publisher, the JPEG
encoders) is a :class:`Worker`: a name ``top -H`` and py-spy show, a stop event its body watches,
and a stop that waits until an absolute deadline and logs a thread that is still busy. A serving
worker registers itself as such when it starts (:func:`inference.affinity.serving_thread`): it
is kept off the inference loop's CPU and runs at a lower priority, so the model gets the CPU.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from inference.affinity import serving_thread

log = logging.getLogger(__name__)


def remaining(deadline: float) -> float:
    """Seconds from now to ``deadline`` (a ``time.monotonic()`` value), never below zero."""
    return max(0.0, deadline - time.monotonic())


class Worker:
    """A thread with a name, an owner that stops it and a stop event its body watches.

    Subclasses implement :meth:`run`, which returns once ``self.stopping`` is set. Started again
    after a stop, a worker runs a fresh thread.
    """

    name = "worker"
    thread_name = ""  # the thread's name, when not ``name`` (an output's name is its API key)
    serving = False  # a serving thread: off the loop's CPU, at a lower priority
    daemon = True  # False: the thread keeps the process alive (the Lambda's keep-alive)
    nice = 0  # added to a serving thread's nice value (--serving-nice)

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.thread_nice: Optional[int] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.alive:
            return
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name=self.thread_name or self.name,
                                        daemon=self.daemon)
        self._thread.start()

    def _main(self) -> None:
        if self.serving:
            self.thread_nice = serving_thread(self.nice)
        try:
            self.run()
        except Exception:  # a worker's bug is logged; its owner sees it stopped
            log.exception("%s stopped by an error", self.name)

    def run(self) -> None:
        raise NotImplementedError

    def signal_stop(self) -> None:
        """Ask the body to end; :meth:`join` waits for it."""
        self.stopping.set()

    def join(self, deadline: float) -> bool:
        """Wait for the thread until ``deadline``; False (and a log line) if it is still busy."""
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(remaining(deadline))
        if thread.is_alive():
            log.warning("%s still busy at its stop deadline", self.name)
            return False
        self._thread = None
        return True

    def stop(self, deadline: float) -> bool:
        self.signal_stop()
        return self.join(deadline)


class FunctionWorker(Worker):
    """A worker whose body is a function of its stop event (``body(stopping)``)."""

    def __init__(self, name: str, body: Callable[[threading.Event], None], serving: bool = False,
                 nice: int = 0, daemon: bool = True) -> None:
        super().__init__()
        self.name = name
        self.serving = serving
        self.nice = nice
        self.daemon = daemon
        self._body = body

    def run(self) -> None:
        self._body(self.stopping)
