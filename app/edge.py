"""What a connection may cost before the app sees it: the size of a request head, the time it
takes to arrive, and how many connections are open at once (issue 16, points 2 and 3).

uvicorn enforces none of these with httptools: a request head of any size is accumulated by
concatenation (``url += chunk`` in uvicorn, ``value += chunk`` in httptools), so its cost grows
with the square of its size (64 MB: 12.9 s of a CPU, the loop at x0.21), and a connection that
never sends a request, or sends one byte a second, is kept forever (``timeout_keep_alive`` is
armed only after a response). Its ``limit_concurrency`` answers 503 only once a request has
arrived, so it keeps every idle socket open; once the process's open-files limit is reached,
``accept`` fails and so do the FIFO, a source reopen and the MQTT reconnect.

:func:`protocol_class` gives uvicorn (``Config(http=...)``) its httptools protocol with:

- a URL of at most ``max_url`` bytes (414) and a head of at most ``max_head`` bytes (431), both
  refused as soon as the limit is passed, before the rest is read or parsed;
- ``header_timeout`` seconds from the connection (or from the first byte of a later request on a
  kept-alive connection) for the head to be complete: an idle or slowloris connection is closed
  (with a 408 if part of a head came). Between requests, uvicorn's ``timeout_keep_alive`` applies.
  Once a head is in, nothing here times the connection: a stream is long-lived by design;
- at most ``max_connections`` open connections, streams included: a new one past it takes the
  slot of the connection that has waited longest for a request head (what nginx does with idle
  keep-alive connections when it runs out), else it is refused at once with a 503.

Every name used from uvicorn exists in uvicorn 0.22 (the device's Python 3.7) and in current ones.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Type

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("app.edge")

# A request line this long is not a URL a person or the page makes (ours are < 200 bytes with a
# token); 8 KiB is what Apache (8190) and nginx (one 8 KiB buffer) take for a request line.
MAX_URL = 8 * 1024
# Browsers send every cookie of the host, whatever its port, so a device that also serves other
# web apps can get a large Cookie header: 64 KiB leaves room for that (nginx takes 4 x 8 KiB,
# Node 16 KiB), and bounds the parser's quadratic accumulation at a few milliseconds.
MAX_HEAD = 64 * 1024
# From the connection (or a later request's first byte) to its last header. A browser sends a
# head in one packet; Chrome closes a preconnected socket it has not used after 10 s itself.
HEADER_TIMEOUT = 10.0
# uvicorn's own default, written down: the idle time between two requests of a connection.
KEEP_ALIVE = 5
# After a 414/431/408 we stop reading the request but keep the socket this long, discarding
# what still comes, so the client reads the answer instead of a reset (closing a socket with
# unread data sends RST, which destroys the answer in the client's buffers).
LINGER = 2.0
# Open descriptors left to everything but connections when the cap is computed: the FIFO and its
# reopen, a source reopen (a file, a camera, RTSP sockets), a model swap, MQTT, static files,
# /proc reads for /metrics, log files. An eighth of the limit, and at least this many.
RESERVE_MIN = 48
# A ceiling whatever the limit (containers often give 1M): past a few thousand connections the
# memory of their buffers, not descriptors, is what a device runs out of.
CAP_CEILING = 4096
CAP_FLOOR = 16
# A refusal is logged at most once per interval per kind, with the count: a flood of them must
# not become a flood of log lines.
LOG_INTERVAL = 60.0


def open_descriptors() -> Optional[int]:
    """How many descriptors the process has open (None where the OS does not list them)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1  # less the one listdir used
        except OSError:
            continue
    return None


def file_limit() -> Optional[int]:
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def connection_cap(limit: Optional[int] = None, in_use: Optional[int] = None) -> int:
    """The most connections the process can hold and still open what the loop and the outputs
    need: the open-files limit less what is open now less a reserve. The soft limit is not raised
    towards the hard one on purpose: paho-mqtt's loop uses select(), which fails on a descriptor
    numbered 1024 or more."""
    limit = file_limit() if limit is None else limit
    if limit is None:
        return CAP_CEILING
    in_use = open_descriptors() if in_use is None else in_use
    if in_use is None:
        in_use = 64  # a typical count at start (the model, the source, the event loop)
    cap = limit - in_use - max(RESERVE_MIN, limit // 8)
    return max(CAP_FLOOR, min(CAP_CEILING, cap))


@dataclass
class EdgeLimits:
    max_url: int = MAX_URL
    max_head: int = MAX_HEAD
    header_timeout: float = HEADER_TIMEOUT
    keep_alive: int = KEEP_ALIVE
    linger: float = LINGER
    # None: computed from the open-files limit when the server starts (connection_cap)
    max_connections: Optional[int] = None


@dataclass
class Edge:
    """One server's limits, its connections waiting for a request head (oldest first) and what
    was refused. Touched only on the event loop."""

    limits: EdgeLimits = field(default_factory=EdgeLimits)
    cap: int = CAP_CEILING
    counts: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("url_too_long", "head_too_large", "header_timeout", "evicted", "refused_full"), 0))
    waiting: OrderedDict[EdgeProtocol, None] = field(default_factory=OrderedDict)
    _logged: Dict[str, float] = field(default_factory=dict)
    _unlogged: Dict[str, int] = field(default_factory=dict)

    def start(self) -> None:
        """Fix the cap now, with the model, the source and the outputs open."""
        limit = file_limit()
        self.cap = self.limits.max_connections or connection_cap(limit)
        log.info("at most %d open connections (open-files limit %s, %s open now)", self.cap,
                 limit if limit is not None else "none", open_descriptors())

    def count(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        now = time.monotonic()
        if now - self._logged.get(kind, -LOG_INTERVAL) >= LOG_INTERVAL:
            more = self._unlogged.pop(kind, 0)
            log.warning("%s%s", detail,
                        f" (and {more} more in the last {LOG_INTERVAL:.0f} s)" if more else "")
            self._logged[kind] = now
        else:
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1

    def stats(self) -> Dict[str, Any]:
        return {"max_connections": self.cap, "waiting_for_a_request": len(self.waiting), **self.counts}

    def protocol_class(self) -> Type[EdgeProtocol]:
        """The class uvicorn makes each connection's protocol from (``Config(http=...)``)."""
        return type("DashboardHttpProtocol", (EdgeProtocol,), {"edge": self})


def _answer(status: bytes, reason: str) -> bytes:
    body = reason.encode("ascii") + b"\n"
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\nconnection: close\r\n\r\n" + body)


BUSY = _answer(b"503 Service Unavailable", "too many open connections; retry shortly")
TIMED_OUT = _answer(b"408 Request Timeout", "the request head did not arrive in time")


class EdgeProtocol(HttpToolsProtocol):
    edge: Edge  # set by Edge.protocol_class

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_head = True
        self._head_bytes = 0
        self._url_bytes = 0
        self._head_timer: Optional[Any] = None
        self._refusal: Optional[bytes] = None
        self._lingering = False

    # -- the connection ---------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        edge = self.edge
        if len(self.connections) > edge.cap and not self._evict_one():
            edge.count("refused_full", f"{len(self.connections) - 1} connections open, the most "
                       f"this process can hold: new ones are refused (503)")
            self._lingering = True  # nothing of it is parsed
            transport.write(BUSY)
            transport.close()
            return
        self._wait_for_head()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for a request head, to make room."""
        for victim in self.edge.waiting:
            if victim is not self:
                victim._stop_waiting()
                victim.transport.close()
                self.edge.count("evicted", "connections at the cap: the one idle longest is "
                                "closed for each new one")
                return True
        return False

    def _wait_for_head(self) -> None:
        self.edge.waiting[self] = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.edge.limits.header_timeout, self._head_timed_out)

    def _stop_waiting(self) -> None:
        self.edge.waiting.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._awaiting_head or self.transport.is_closing() or self._responding():
            return  # a head behind a response still streaming is that response's business
        self.edge.count("header_timeout", f"no complete request head within "
                        f"{self.edge.limits.header_timeout:g} s: connection closed")
        self._stop_waiting()
        if self._head_bytes:
            self._refuse(TIMED_OUT)
        else:
            self.transport.close()

    # -- reading ----------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # refused: read only so the answer is not lost to a reset
        if not self._awaiting_head:
            super().data_received(data)
        else:
            if self._head_timer is None and not self._responding():
                self._arm_head_timer()  # the first byte of a later request: keep-alive idle is over
            room = self.edge.limits.max_head - self._head_bytes
            self._head_bytes += len(data)
            # Parse only what fits: a head completed inside it lets the rest through as a body.
            super().data_received(data[:room] if len(data) > room else data)
            if len(data) > room and self._refusal is None and not self.transport.is_closing():
                if self._awaiting_head:
                    limit = self.edge.limits.max_head
                    self.edge.count("head_too_large", f"request head over {limit} bytes refused (431)")
                    self._refusal = _answer(b"431 Request Header Fields Too Large",
                                            f"request head larger than {limit} bytes")
                else:
                    self.data_received(data[room:])
        if self._refusal is not None and not self._lingering:
            self._refuse(self._refusal)

    def on_message_begin(self) -> None:
        self._url_bytes = 0
        super().on_message_begin()

    # The parser goes on to the end of the bytes it was given after a refusal: these callbacks
    # then do nothing, and data_received answers once the parser returns. (Raising from one
    # would reach uvicorn as a parser error: a 400 and a warning logged for each.)
    def on_url(self, url: bytes) -> None:
        if self._refusal is not None:
            return
        self._url_bytes += len(url)
        limit = self.edge.limits.max_url
        if self._url_bytes > limit:
            self.edge.count("url_too_long", f"request line over {limit} bytes refused (414)")
            self._refusal = _answer(b"414 URI Too Long", f"request line longer than {limit} bytes")
            return
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refusal is None:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refusal is not None:
            return
        self._awaiting_head = False
        self._head_bytes = 0
        self._stop_waiting()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is not None:
            return
        self._awaiting_head = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._awaiting_head and not self.transport.is_closing():
            # Idle now (uvicorn's keep-alive timer runs): the first to go at the cap.
            self.edge.waiting[self] = None

    # -- refusing ---------------------------------------------------------------------------------
    def _refuse(self, answer: bytes) -> None:
        """Answer, send FIN, and discard what still comes for up to ``linger`` seconds."""
        self._stop_waiting()
        self._lingering = True
        if self.transport.is_closing():
            return
        if not self._responding():
            self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(self.edge.limits.linger, self.transport.close)
        else:  # TLS: no half-close
            self.transport.close()

    def eof_received(self) -> None:
        if self._lingering:
            self.transport.close()
        else:
            super().eof_received()
