"""What Python 3.7 (the DeepLens's interpreter) lacks and the product needs, in one place."""

from __future__ import annotations

import ctypes
import sys
import threading

_SYS_GETTID = {"x86_64": 186, "i386": 224, "i686": 224, "aarch64": 178, "armv7l": 224}


def native_thread_id() -> int:
    """The calling thread's OS id (what ``top -H`` and /proc/PID/task know it by)."""
    getter = getattr(threading, "get_native_id", None)  # 3.8+
    if getter is not None:
        return int(getter())
    import platform

    number = _SYS_GETTID.get(platform.machine())
    if sys.platform.startswith("linux") and number is not None:
        try:
            return int(ctypes.CDLL(None, use_errno=True).syscall(number))
        except (OSError, AttributeError):
            pass
    return threading.get_ident()


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or "unknown"."""
    if sys.version_info >= (3, 8):
        from importlib import metadata
    else:  # pragma: no cover - Python 3.7
        import importlib_metadata as metadata
    try:
        return str(metadata.version(name))
    except metadata.PackageNotFoundError:
        return "unknown"
