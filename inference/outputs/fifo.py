"""FifoWriter: the DeepLens project stream, bare JPEGs back to back in a named pipe.

``mplayer -demuxer lavf -lavfdopts format=mjpeg:probesize=32 /tmp/results.mjpeg`` and
``ffmpeg -f mjpeg -i /tmp/results.mjpeg`` play it, as they played the seed's ``LocalDisplay``.

Unlike the seed, the writer never blocks anyone and never spins:
- the FIFO is opened with ``O_NONBLOCK``; ENXIO means no reader yet, so it polls ~4 times a second;
- each new frame is written once (the hub's sequence number), none while nothing changes;
- a reader that falls behind makes frames drop: a frame is only started when the pipe holds less
  than about one frame, so the stream stays fresh and the loop never waits;
- a frame already started is always finished (a half JPEG followed by the next one would corrupt
  the reader's stream): the rest waits, without blocking, until the reader makes room or leaves;
- a reader that leaves (EPIPE, or POLLERR while idle) sends the writer back to waiting for the next;
- a reader that stays but takes no frame for ``stuck_after`` seconds while newer ones wait is a
  fault /health names (every frame is being dropped for it), cleared when it reads again;
- one writer per path: a lock on ``PATH.lock`` beside the FIFO (``flock``, released by the kernel
  however the holder ends, so never stale). A second dashboard on the same path warns, shows it
  in /health and writes nothing (two writers would interleave their JPEGs into garbage); it takes
  over when the first one exits. A FIFO has no way to tell its writers apart, hence the lock;
- the FIFO this writer made is removed at a clean stop (one it found is left as it was).

The JPEG is the hub's shared encode, so HTTP viewers at the same resolution cost no second encode.
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

from inference.outputs.base import OutputError
from inference.pipeline.frames import FrameHub
from inference.settings import Settings
from inference.workers import Worker

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.25  # reader polling and idle wake-ups: ~4 Hz, ~0 CPU
PIPE_SIZE = 1 << 20  # a whole 1080p JPEG fits behind one unread frame: partial writes stay rare
MIN_BACKLOG = 64 * 1024  # a reader with less than this unread is keeping up
STUCK_SECONDS = 5.0  # a reader that takes no frame this long while newer ones wait is stuck


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


def check_creatable(path: str) -> None:
    """Refuse a FIFO that cannot be made at ``path`` (its directory missing, not writable, or on
    a full filesystem), naming --fifo, when the outputs are built: found only when the writer
    starts, it aborted the process with the loop already running."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(folder)
    except OSError as exc:
        raise OutputError("--fifo", f"cannot make the FIFO {path}: {folder}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError("--fifo", f"cannot make the FIFO {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError("--fifo", f"cannot make the FIFO {path}: cannot write into {folder}")
    vfs = os.statvfs(folder)
    # A FIFO takes an inode, its lock file an inode and a block (the writer's pid). f_files is 0
    # on filesystems without an inode count.
    if (vfs.f_files and not vfs.f_favail) or not vfs.f_bavail:
        raise OutputError("--fifo", f"cannot make the FIFO {path}: the filesystem of {folder} is "
                          "full (No space left on device)")


def _unread_bytes(fd: int) -> int | None:
    """Bytes written to the pipe and not yet read (Linux FIONREAD works on the write end too)."""
    fionread = getattr(termios, "FIONREAD", None)
    if fionread is None:
        return None
    try:
        return int.from_bytes(fcntl.ioctl(fd, fionread, bytes(4)), sys.byteorder)
    except OSError:
        return None


class FifoWriter(Worker):
    name = "fifo"  # its key in /health, /api/stats and /metrics
    thread_name = "fifo-writer"
    serving = True

    def __init__(
        self, path: str, hub: FrameHub, res: str = "480p", poll_interval: float = POLL_INTERVAL,
        nice: int = 0, stuck_after: float = STUCK_SECONDS,
    ) -> None:
        super().__init__()
        self.path = path
        self.nice = nice  # added to the writer thread's nice value (--serving-nice)
        self.hub = hub
        self.res = res
        self.poll_interval = poll_interval
        # Refuse a regular file, or a FIFO that cannot be made, at build time, before anything starts.
        if not check_path(path):
            check_creatable(path)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pending: memoryview | None = None  # the unwritten rest of a frame already started
        self._pending_size = 0
        self._state = "stopped"
        self._problem: str | None = None
        self.frames_written = 0
        self.bytes_written = 0
        self.frames_dropped = 0  # not written because the reader was behind
        self.frames_skipped = 0  # published while the writer was busy (any cause)
        self.partial_writes = 0  # frames finished later, when the reader made room
        self.readers = 0  # readers served since start
        self.open_attempts = 0
        self.errors = 0
        self.last_error: str | None = None
        self.stuck_after = stuck_after
        self._delivered_at = 0.0  # when the reader last got a whole frame (or opened)
        self._delivered_seq = 0
        self._writing_seq = 0
        self.lock_path = path + ".lock"
        self._lock_fd: int | None = None
        self._other_writer: str | None = None  # why this one waits: another dashboard's lock
        self._made: tuple[int, int] | None = None  # (st_dev, st_ino) of the FIFO this one made

    # -- one writer per path -------------------------------------------------------------------
    def _take_lock(self) -> bool:
        """True when this writer holds PATH.lock (or cannot make one: then it goes on without)."""
        if self._lock_fd is not None:
            return True
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            log.debug("no lock beside %s (%s): not checking for another writer", self.path, exc)
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder removes the file at its exit: a lock on a file no longer at the path
            # would exclude no one, so take it again on the file that is there now.
            held, there = os.fstat(fd), os.stat(self.lock_path)
            if (held.st_dev, held.st_ino) != (there.st_dev, there.st_ino):
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError) as exc:
            owner = ""
            if isinstance(exc, BlockingIOError):
                try:
                    owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
                except OSError:
                    pass
            os.close(fd)
            message = (f"another dashboard{f' (pid {owner})' if owner else ''} writes to "
                       f"{self.path}; this one writes nothing until it exits (two writers would "
                       "mix their frames): give this one another --fifo, or --fifo off")
            if self._other_writer != message:
                log.warning("project stream: %s", message)
            self._other_writer = message
            return False
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # a full filesystem: the lock holds all the same, nameless
            log.debug("cannot write the pid into %s: %s", self.lock_path, exc)
        self._lock_fd = fd
        if self._other_writer is not None:
            log.info("project stream: the other writer of %s is gone; writing to it now", self.path)
        self._other_writer = None
        return True

    def _release(self) -> None:
        """Remove the FIFO this writer made (if still the one) and the lock, at a clean stop."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        if self._made is not None:
            try:
                st = os.stat(self.path)
                if stat.S_ISFIFO(st.st_mode) and (st.st_dev, st.st_ino) == self._made:
                    os.unlink(self.path)
                    log.info("removed FIFO %s", self.path)
            except OSError:
                pass  # gone already, or replaced: not ours to touch
            self._made = None
        try:
            os.unlink(self.lock_path)  # while holding it, so no one waits on a removed file
        except OSError:
            pass
        os.close(fd)

    # -- Output --------------------------------------------------------------------------------
    def start(self) -> None:
        if self.alive:
            return
        self._problem = None
        self._state = "waiting for a reader"
        try:
            if self._take_lock() and not check_path(self.path):
                self._mkfifo()
        except OutputError as exc:
            # Gone bad since the build (the directory removed, the disk filled): a fault for
            # /health that the thread retries, not an error out of the service's start.
            self._degrade(exc.message)
        super().start()
        if self._other_writer is None and self._problem is None:
            log.info("project stream FIFO %s (%s): waiting for a reader", self.path, self.res)

    def stop(self, deadline: float) -> bool:
        stopped = super().stop(deadline)
        self._close()
        self._state = "stopped"
        if stopped:
            self._release()
        return stopped

    def health(self) -> tuple[bool, str]:
        if self._other_writer:
            return False, self._other_writer
        if self._problem:
            return False, self._problem
        stuck = self._stuck_for()
        if stuck is not None:
            return False, (f"{self.path}: a reader attached but took no frame for {stuck:.0f} s "
                           "(frames are dropped for it): is it paused or stuck?")
        return True, f"{self.path}: {self._state}"

    def _stuck_for(self) -> float | None:
        """Seconds the attached reader has taken nothing while newer frames waited, if too long."""
        if self._fd is None or self.hub.seq <= self._delivered_seq:
            return None  # no reader, or it has everything (a paused loop makes nothing new)
        waited = time.monotonic() - self._delivered_at
        return waited if waited > self.stuck_after else None

    def stats(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "res": self.res,
            "state": self._state,
            "reader": self._fd is not None,
            "frames_written": self.frames_written,
            "bytes_written": self.bytes_written,
            "frames_dropped": self.frames_dropped,
            "frames_skipped": self.frames_skipped,
            "partial_writes": self.partial_writes,
            "readers": self.readers,
            "open_attempts": self.open_attempts,
            "errors": self.errors,
            "last_error": self.last_error,
            "problem": self._problem,
            "other_writer": self._other_writer,
            "made_by_this_run": self._made is not None,
            "thread_nice": self.thread_nice,
        }

    def apply(self, settings: Settings) -> None:
        # Read by the writer thread at its next frame: a plain attribute swap is enough.
        self.res = settings.fifo_res

    # -- the thread ----------------------------------------------------------------------------
    def run(self) -> None:
        stop = self.stopping
        seq = 0
        checked = time.monotonic()
        while not stop.is_set():
            try:
                if self._lock_fd is None and not self._take_lock():
                    stop.wait(self.poll_interval)
                    continue
                if self._fd is None:
                    if not self._open():
                        stop.wait(self.poll_interval)
                        continue
                    seq = 0  # a new reader gets the latest frame at once, even from a paused loop
                    checked = time.monotonic()
                if time.monotonic() - checked >= self.poll_interval:
                    checked = time.monotonic()
                    if not self._reader_still_there():
                        continue
                if self._pending is not None:
                    self._flush_pending()
                    continue
                if self.hub.closed:
                    stop.wait(self.poll_interval)
                    continue
                frame = self.hub.wait_newer(seq, self.poll_interval)
                if frame is None:
                    continue
                # A source smaller than --fifo-res is written at its own size, as viewers get it:
                # an upscale would cost a resize and a second encode per frame and show nothing
                # more (mplayer scales the window itself).
                encoded = self.hub.encode(self.res, frame)
                if encoded is not None:
                    if seq:
                        self.frames_skipped += encoded.seq - seq - 1
                    seq = self._writing_seq = encoded.seq
                    self._write_frame(encoded.jpeg(self.res) or b"")
            except Exception as exc:  # the writer must outlive any one bad frame
                self.errors += 1
                self.last_error = str(exc) or type(exc).__name__
                log.exception("fifo writer error")
                self._close()
                stop.wait(self.poll_interval)

    def _mkfifo(self) -> None:
        try:
            os.mkfifo(self.path, 0o644)
            st = os.stat(self.path)
            self._made = (st.st_dev, st.st_ino)
            log.info("created FIFO %s", self.path)
        except FileExistsError:
            check_path(self.path)  # someone else made it first: still refuse a regular file
        except OSError as exc:
            raise OutputError("--fifo", f"cannot create FIFO {self.path}: {exc.strerror}") from None

    def _open(self) -> bool:
        """Open the FIFO for writing if a reader is there; never waits for one."""
        try:
            if not check_path(self.path):
                self._mkfifo()  # deleted while running (a tmp cleaner): ours to make again
        except OutputError as exc:
            self._degrade(exc.message)
            return False
        self._recovered()
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
        # Python < 3.10 lacks the name; Linux's number for it is 1031.
        setsz = getattr(fcntl, "F_SETPIPE_SZ", 1031 if sys.platform.startswith("linux") else None)
        if setsz is not None:
            try:
                fcntl.fcntl(fd, setsz, PIPE_SIZE)
            except OSError:
                pass  # over /proc/sys/fs/pipe-max-size: the default 64 KiB works, less smoothly
        self._delivered_at, self._delivered_seq = time.monotonic(), 0
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
        self._state = f"stopped: {message}"  # the fault as it is (ENOSPC is no "not a FIFO")

    def _recovered(self) -> None:
        """The path is a FIFO again: the fault is over, with or without a reader."""
        if self._problem is None:
            return
        log.info("project stream: %s is a FIFO again; waiting for a reader", self.path)
        self._problem = None
        self._state = "waiting for a reader"

    def _reader_still_there(self) -> bool:
        """Notice a reader that left (POLLERR on the write end) and a path no longer a FIFO."""
        fd = self._fd
        if fd is None:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLERR)
        if any(ev & select.POLLERR for _, ev in poller.poll(0)):
            log.info("project stream: the reader left %s", self.path)
            self._close()
            return False
        try:
            check_path(self.path)
        except OutputError as exc:
            self._close()
            self._degrade(f"{exc.message}; writing stopped, file left untouched")
            return False
        return True

    def _write_frame(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:
            return
        unread = _unread_bytes(fd)
        if unread is not None and unread > max(len(data), MIN_BACKLOG):
            self.frames_dropped += 1  # the reader is behind: skip this frame, stay fresh
            return
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            self.frames_dropped += 1  # full, nothing of this frame went in
            return
        except BrokenPipeError:
            log.info("project stream: the reader left %s", self.path)
            self._close()
            return
        if written < len(data):
            self.partial_writes += 1
            self._pending = memoryview(data)[written:]
            self._pending_size = len(data)
            return
        self._count(len(data))

    def _flush_pending(self) -> None:
        """Write more of the started frame when the reader makes room; wait at most one poll
        interval for that, so stop and a departed reader are noticed."""
        fd, rest = self._fd, self._pending
        if fd is None or rest is None:
            return
        poller = select.poll()
        poller.register(fd, select.POLLOUT | select.POLLERR)
        events = poller.poll(self.poll_interval * 1000)
        if any(ev & select.POLLERR for _, ev in events):
            log.info("project stream: the reader left %s mid-frame", self.path)
            self._close()
            return
        if not events:
            return
        try:
            rest = rest[os.write(fd, rest):]
        except BlockingIOError:
            return
        except BrokenPipeError:
            self._close()
            return
        if rest:
            self._pending = rest
        else:
            self._pending = None
            self._count(self._pending_size)

    def _count(self, size: int) -> None:
        self.frames_written += 1
        self.bytes_written += size
        self._delivered_at, self._delivered_seq = time.monotonic(), self._writing_seq

    def _close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            self._pending = None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        if self._state == "writing to a reader":
            self._state = "waiting for a reader"
