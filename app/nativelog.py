"""The native libraries' stderr (OpenCV, the FFmpeg inside it) turned into log records.

OpenCV and FFmpeg write their warnings straight to file descriptor 2 (``[ WARN:0@1.810] global
cap_v4l.cpp ...``, ``[h264 @ 0x55...] error while decoding MB ...``): around Python's logging, so
they break the log's format, ignore ``--log-level`` and, for a broken stream, repeat forever.
:class:`NativeStderr` points descriptor 2 at a pipe; its thread ``native-log`` reads the lines and
logs them on the ``native`` logger (level from the line's tag, a repeated line at most once per
:data:`REPEAT_SECONDS`). Python's own ``sys.stderr`` and the log handlers are moved to a copy of
the original stream first, so a Python traceback or a log record never depends on that thread and
can never loop back into the pipe.

What a native crash prints in its last instant (an ``abort()`` message) may be lost with the
process, as the thread that would have logged it dies too; the exit status still tells.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

log = logging.getLogger("native")

REPEAT_SECONDS = 30.0
MAX_KEYS = 512  # distinct lines remembered for the repeat limit; forgotten all at once beyond
_TAG = re.compile(r"^\[\s*(WARN|ERROR|INFO|DEBUG|FATAL)[^\]]*\]\s*")
_VARYING = re.compile(r"0x[0-9a-fA-F]+|\d+")
_LEVELS = {"WARN": logging.WARNING, "ERROR": logging.ERROR, "INFO": logging.INFO,
           "DEBUG": logging.DEBUG, "FATAL": logging.CRITICAL}


class NativeStderr:
    """Descriptor 2 through the log while started; :meth:`stop` puts it back."""

    def __init__(self) -> None:
        self._saved: Optional[int] = None
        self._read: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._last: Dict[str, float] = {}
        self._moved: List[Tuple[logging.StreamHandler, Any]] = []  # type: ignore[type-arg]
        self._old_stderr: Optional[Any] = None
        self._stream: Optional[io.TextIOWrapper] = None

    def start(self) -> None:
        if self._thread is not None:
            return
        sys.stderr.flush()
        self._saved = os.dup(2)
        stream = io.TextIOWrapper(io.FileIO(os.dup(self._saved), "w"), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
        # Whatever writes to descriptor 2 from Python moves to the copy (and back at stop);
        # a redirected sys.stderr (a test's StringIO) is left as it is.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and _on_fd2(handler.stream):
                self._moved.append((handler, handler.setStream(stream)))
        if _on_fd2(sys.stderr):
            self._old_stderr, sys.stderr = sys.stderr, stream
        self._stream = stream
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self._read = read
        self._thread = threading.Thread(target=self._run, name="native-log", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Descriptor 2 back to the original stream; the thread logs what is left and ends."""
        if self._thread is None or self._saved is None:
            return
        os.dup2(self._saved, 2)  # drops the pipe's last write end: the reader sees its end
        os.close(self._saved)
        self._saved = None
        self._thread.join(timeout)
        self._thread = None
        for handler, old in self._moved:
            handler.setStream(old)
        self._moved.clear()
        if self._old_stderr is not None:
            sys.stderr, self._old_stderr = self._old_stderr, None
        if self._stream is not None:
            self._stream.flush()
            self._stream.close()
            self._stream = None

    def _run(self) -> None:
        assert self._read is not None
        with open(self._read, "rb", closefd=True) as pipe:
            for raw in pipe:
                line = raw.decode("utf-8", "backslashreplace").rstrip()
                if line:
                    self.emit(line)

    def emit(self, line: str) -> None:
        match = _TAG.match(line)
        level = _LEVELS[match.group(1)] if match else logging.WARNING
        text = line[match.end():] if match else line
        key = _VARYING.sub("#", text)
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < REPEAT_SECONDS:
            return
        if len(self._last) >= MAX_KEYS:
            self._last.clear()
        self._last[key] = now
        log.log(level, "%s", text)


def _on_fd2(stream: Any) -> bool:
    try:
        return int(stream.fileno()) == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


__all__ = ["NativeStderr"]
