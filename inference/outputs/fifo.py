"""FifoWriter: the DeepLens project stream, bare JPEGs back to back in a named pipe.

``mplayer -demuxer lavf -lavfdopts format=mjpeg:probesize=32 /tmp/results.mjpeg`` and
``ffmpeg -f mjpeg -i /tmp/results.mjpeg`` play it, as they played the seed's ``LocalDisplay``.

Unlike the seed, the writer never blocks anyone: the FIFO is opened with ``O_NONBLOCK`` (ENXIO
means no reader yet, so it polls a few times a second), each new frame is written once, a full
pipe drops frames instead of stalling, and a reader that leaves (EPIPE) sends the writer back to
waiting for the next one. The JPEG is the hub's shared encode, so HTTP viewers at the same
resolution cost no second encode.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import stat
import sys
import termios
import threading
import time
from typing import Any

from inference.config import Settings
from inference.hub import FrameHub
from inference.outputs import OutputError

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.25  # reader polling and idle wake-ups: ~4 Hz, ~0 CPU
WRITE_TIMEOUT = 1.0  # a reader that takes longer to accept the rest of one JPEG is dropped
PIPE_SIZE = 1 << 20  # room for a few 1080p JPEGs, so a briefly slow reader costs no frame
_PAGE = 4096


def check_path(path: str) -> bool:
    """True when ``path`` is a FIFO, False when it does not exist; anything else is refused."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise OutputError("--fifo", f"cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISFIFO(st.st_mode):
        raise OutputError(
            "--fifo",
            f"{path} exists and is not a FIFO; refusing to overwrite it "
            "(remove it, give another path, or --fifo off)",
        )
    return True


class FifoWriter:
    name = "fifo"

    def __init__(
        self,
        path: str,
        hub: FrameHub,
        res: str = "480p",
        poll_interval: float = POLL_INTERVAL,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self.path = path
        self.hub = hub
        self.res = res
        self.poll_interval = poll_interval
        self.write_timeout = write_timeout
        check_path(path)  # refuse a regular file at build time, before anything starts
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._state = "stopped"
        self._problem: str | None = None
        self.frames_written = 0
        self.bytes_written = 0
        self.frames_dropped = 0  # pipe full: the reader is behind
        self.readers = 0  # readers served since start
        self.readers_dropped = 0  # stuck in the middle of a frame for longer than write_timeout
        self.open_attempts = 0
        self.errors = 0
        self.last_error: str | None = None

    # -- Output --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        if not check_path(self.path):
            self._mkfifo()
        self._stop = threading.Event()
        self._problem = None
        self._state = "waiting for a reader"
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="fifo-writer", daemon=True
        )
        self._thread.start()
        log.info("project stream FIFO %s (%s): waiting for a reader", self.path, self.res)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("fifo writer still busy after %.1f s", timeout)
        self._close()
        self._state = "stopped"

    def health(self) -> tuple[bool, str]:
        if self._problem:
            return False, self._problem
        if self._state == "stopped":
            return True, f"{self.path}: stopped"
        return True, f"{self.path}: {self._state}"

    def stats(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "res": self.res,
            "state": self._state,
            "reader": self._fd is not None,
            "frames_written": self.frames_written,
            "bytes_written": self.bytes_written,
            "frames_dropped": self.frames_dropped,
            "readers": self.readers,
            "readers_dropped": self.readers_dropped,
            "open_attempts": self.open_attempts,
            "errors": self.errors,
            "last_error": self.last_error,
            "problem": self._problem,
        }

    def apply(self, settings: Settings) -> None:
        # Read by the writer thread at its next frame: a plain attribute swap is enough.
        self.res = settings.fifo_res

    # -- the thread ----------------------------------------------------------------------------
    def _run(self, stop: threading.Event) -> None:
        seq = 0
        checked = time.monotonic()
        while not stop.is_set():
            try:
                if self._fd is None:
                    if not self._open():
                        stop.wait(self.poll_interval)
                        continue
                    # A new reader gets the latest frame at once, even from a paused loop.
                    seq = 0
                    checked = time.monotonic()
                if self.hub.closed:
                    stop.wait(self.poll_interval)
                    continue
                item = self.hub.wait_newer(seq, self.poll_interval)
                if item is None or time.monotonic() - checked >= self.poll_interval:
                    checked = time.monotonic()
                    self._check_reader()
                if item is None or self._fd is None:
                    continue
                seq = item.seq
                encoded = self.hub.jpeg(self.res, item)
                if encoded is not None:
                    self._write_frame(encoded.jpeg, stop)
            except Exception as exc:  # the writer must outlive any one bad frame
                self.errors += 1
                self.last_error = str(exc) or type(exc).__name__
                log.exception("fifo writer error")
                self._close()
                stop.wait(self.poll_interval)

    def _mkfifo(self) -> None:
        try:
            os.mkfifo(self.path, 0o644)
            log.info("created FIFO %s", self.path)
        except FileExistsError:
            check_path(self.path)  # someone else made it first: still refuse a regular file
        except OSError as exc:
            raise OutputError("--fifo", f"cannot create FIFO {self.path}: {exc.strerror}") from None

    def _open(self) -> bool:
        """Open the FIFO for writing if a reader is there; never waits for one."""
        try:
            if not check_path(self.path):
                # Deleted while running (a tmp cleaner): ours to make again.
                self._mkfifo()
        except OutputError as exc:
            self._degrade(exc.message)
            return False
        self.open_attempts += 1
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet, the normal wait
                self.errors += 1
                self.last_error = f"open {self.path}: {exc.strerror}"
                self._state = f"cannot open: {exc.strerror}"
            return False
        # The path may have been swapped for a regular file between the check and the open:
        # never write into something that is not a pipe.
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            self._degrade(f"{self.path} is no longer a FIFO; writing stopped, file left untouched")
            return False
        self._grow_pipe(fd)
        with self._lock:
            self._fd = fd
        self._problem = None
        self.readers += 1
        self._state = "writing to a reader"
        log.info("project stream: a reader opened %s", self.path)
        return True

    def _degrade(self, message: str) -> None:
        if self._problem != message:
            log.error("project stream: %s", message)
        self._problem = message
        self._state = "stopped: path is not a FIFO"

    @staticmethod
    def _grow_pipe(fd: int) -> None:
        setsz = getattr(fcntl, "F_SETPIPE_SZ", None)
        if setsz is None:
            return
        try:
            fcntl.fcntl(fd, setsz, PIPE_SIZE)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the default 64 KiB still works, with more drops

    def _free_space(self, fd: int) -> int | None:
        """Bytes the pipe can take now without a partial write, or None when unknown."""
        getsz = getattr(fcntl, "F_GETPIPE_SZ", None)
        fionread = getattr(termios, "FIONREAD", None)
        if getsz is None or fionread is None:
            return None
        try:
            size = fcntl.fcntl(fd, getsz)
            queued = int.from_bytes(fcntl.ioctl(fd, fionread, bytes(4)), sys.byteorder)
        except OSError:
            return None
        # The kernel counts pages, not bytes: a half-read head page still takes a whole slot.
        return size - queued - 2 * _PAGE

    def _check_reader(self) -> None:
        """While idle, notice a reader that left (POLLERR) and a path replaced by a file."""
        fd = self._fd
        if fd is None:
            return
        poller = select.poll()
        poller.register(fd, select.POLLERR | select.POLLHUP)
        if poller.poll(0):
            log.info("project stream: the reader left %s", self.path)
            self._close()
            return
        try:
            check_path(self.path)
        except OutputError as exc:
            self._close()
            self._degrade(exc.message)

    def _write_frame(self, data: bytes, stop: threading.Event) -> None:
        fd = self._fd
        if fd is None:
            return
        free = self._free_space(fd)
        if free is not None and free < len(data):
            self.frames_dropped += 1  # the reader is behind: skip this frame, keep the stream whole
            return
        view = memoryview(data)
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            self.frames_dropped += 1
            return
        except BrokenPipeError:
            log.info("project stream: the reader left %s", self.path)
            self._close()
            return
        if written < len(data) and not self._finish(fd, view[written:], stop):
            return
        self.frames_written += 1
        self.bytes_written += len(data)

    def _finish(self, fd: int, rest: memoryview, stop: threading.Event) -> bool:
        """Write the rest of a frame already started: a half JPEG followed by the next one
        would corrupt the reader's stream, so either it all goes or the reader is dropped."""
        poller = select.poll()
        poller.register(fd, select.POLLOUT | select.POLLERR)
        deadline = time.monotonic() + self.write_timeout
        while rest:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or stop.is_set():
                self.readers_dropped += 1
                log.warning(
                    "project stream: reader of %s stuck mid-frame for %.1f s; dropping it",
                    self.path, self.write_timeout,
                )
                self._close()
                return False
            if not poller.poll(min(remaining, 0.1) * 1000):
                continue
            try:
                rest = rest[os.write(fd, rest):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                log.info("project stream: the reader left %s mid-frame", self.path)
                self._close()
                return False
        return True

    def _close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        if self._state == "writing to a reader":
            self._state = "waiting for a reader"
