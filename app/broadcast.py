"""Fan-out of the hub's frames and results to HTTP viewers, on the event loop.

The hub's listener hands each new sequence number to the event loop (``call_soon_threadsafe``);
viewers await an ``asyncio.Event`` for it, so a waiting viewer holds no thread. The first viewer
to want a frame at a resolution hands the encode to a few serving threads (the hub encodes it,
once) and every other viewer awaits the same future. With no viewer nothing is encoded.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import itertools
import logging
import queue
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Tuple, TypeVar

from starlette.types import Message, Send

from inference.pipeline.frames import Frame, FrameHub
from inference.workers import FunctionWorker

if TYPE_CHECKING:
    from inference.events.recorder import Recorder
    from inference.service import Service

log = logging.getLogger(__name__)

T = TypeVar("T")

TICK = 0.25  # how late a waiter may notice a deadline or the shutdown
ENCODER_THREADS = 2  # a few resolutions in flight at once; the hub serializes each resolution
FPS_WINDOW = 2.0
# A viewer or SSE subscriber whose socket takes no byte for this long, while a send of ours waits
# for it, is disconnected and its slot freed. Progress is any byte the peer's TCP stack accepts,
# so a reader on a poor link (even a few KB/s, a frame every several seconds) is never evicted
# for being slow, only for taking nothing. Ten seconds rides out what a live client does: TCP's
# retransmission backoff after a short Wi-Fi outage (0.2+0.4+...+3.2 s before the 6th retry),
# a phone changing networks, a browser's busy main thread; a client that took nothing for 10 s
# while frames kept coming is gone or hostile, and a full cap frees in ~10 s, not never.
STALL_SECONDS = 10.0
# Event notices kept for subscribers still sending earlier ones; one further behind is told it
# missed some ("gap") and the page reloads the history. Notices come a few per second at most.
NOTICES_KEPT = 64
_SIOCOUTQ = 0x5411  # Linux: bytes in a TCP socket's send queue, sent or not, not yet acked


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the event loop has closed: nobody awaits its futures any more


def _post(loop: asyncio.AbstractEventLoop, future: asyncio.Future[T], result: T | None,
          error: BaseException | None) -> None:
    _call_soon(loop, _settle, future, result, error)


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Frames are a few MB each. After the first one is freed, glibc raises its mmap threshold and
    serves later frame-sized buffers from the heap, where a burst of viewers (encode buffers,
    socket backlogs) leaves them cached after everyone has gone: the soak measured tens of MB kept
    this way. Called when the last viewer leaves, so it costs nothing per frame.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


async def call_in_thread(name: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a fresh named thread, awaited without blocking the event loop.

    For the rare slow calls (start/stop the loop, load a model). Not asyncio.to_thread: its
    executor refuses work once the interpreter's main thread has ended, which is how a Lambda
    module that only starts threads at import can live.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task, which re-raises it
            _post(loop, future, None, exc)
        else:
            _post(loop, future, result, None)

    # Daemon: a model load that never returns must not keep the process from exiting.
    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


def find_transport(*callables: Any) -> asyncio.Transport | None:
    """The connection's asyncio transport, reached from the ASGI ``receive``/``send`` the server
    gave (uvicorn's are methods of an object with a ``transport``), through middleware wrappers
    (closures, partials). ASGI offers no way to drop a connection whose client stopped reading:
    uvicorn's ``send`` just waits for the buffer to drain, forever. None if not found."""
    seen: set[int] = set()
    todo = list(callables)
    while todo and len(seen) < 64:
        obj = todo.pop(0)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        transport = getattr(getattr(obj, "__self__", None), "transport", None)
        # Duck-typed: uvloop's transports do not subclass asyncio.Transport.
        if callable(getattr(transport, "abort", None)) and \
                callable(getattr(transport, "get_write_buffer_size", None)):
            return transport
        for attr in ("__wrapped__", "func"):
            inner = getattr(obj, attr, None)
            if callable(inner):
                todo.append(inner)
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(content):
                todo.append(content)
    return None


def unsent_bytes(transport: asyncio.Transport) -> int:
    """Bytes written to ``transport`` that the peer has not taken: asyncio's buffer plus, on
    Linux, the socket's send queue (sent or not, unacknowledged), so a peer that takes nothing
    shows as soon as its receive window closes, not once our buffers are full too."""
    size = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and sys.platform.startswith("linux"):
        try:
            import fcntl

            queued = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
            size += struct.unpack("i", queued)[0]
        except (OSError, ValueError, ImportError):
            pass
    return size


_Job = Tuple[str, Frame, asyncio.AbstractEventLoop, "asyncio.Future[Frame]"]


class _Encoders:
    """A few named serving threads that run the hub's encodes for the event loop."""

    def __init__(self, hub: FrameHub, threads: int = ENCODER_THREADS, nice: int = 0) -> None:
        self.hub = hub
        self._jobs: queue.SimpleQueue[Optional[_Job]] = queue.SimpleQueue()
        self.workers = [FunctionWorker(f"jpeg-encode-{i}", self._run, serving=True, nice=nice)
                        for i in range(threads)]
        for worker in self.workers:
            worker.start()

    def submit(self, res: str, frame: Frame) -> asyncio.Future[Frame]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Frame] = loop.create_future()
        self._jobs.put((res, frame, loop, future))
        return future

    def _run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            job = self._jobs.get()
            if job is None:
                return
            res, frame, loop, future = job
            del job  # an idle thread must not keep the last frame alive
            try:
                encoded = self.hub.encode(res, frame)
            except Exception as exc:
                _post(loop, future, None, exc)
            else:
                _post(loop, future, encoded, None)
            del frame, encoded

    def stop(self, deadline: float) -> None:
        for worker in self.workers:
            worker.signal_stop()
            self._jobs.put(None)
        for worker in self.workers:
            worker.join(deadline)


class _Rate:
    """Events per second over the last FPS_WINDOW seconds (or since the first event, if younger)."""

    def __init__(self, maxlen: int = 1024) -> None:
        self._times: collections.deque[float] = collections.deque(maxlen=maxlen)
        self._first: float | None = None

    def add(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._times.append(now)

    def per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self._first is None:
            return 0.0
        span = min(FPS_WINDOW, now - self._first)
        if span < 0.2:
            return 0.0
        # A snapshot: the inference thread may append while the event loop reads.
        recent = sum(1 for t in tuple(self._times) if now - t <= span)
        return recent / span


@dataclass
class Viewer:
    id: int
    client: str
    res: str
    fps_cap: float | None
    kind: str = "mjpeg"
    connected: float = field(default_factory=time.monotonic)
    sent: int = 0
    skipped: int = 0
    resent: int = 0
    last_seq: int = 0
    _rate: _Rate = field(default_factory=_Rate, repr=False)
    # The stall watchdog (Broadcaster._tick): the connection, what our sends gave it, and what
    # the last look saw.
    transport: Optional[asyncio.Transport] = field(default=None, repr=False)
    evicted: bool = False
    in_send: bool = False
    sends: int = 0
    written: int = 0
    _seen_send: int = -1
    _seen_written: int = 0
    _unsent: int = -1
    _progress_at: float = field(default_factory=time.monotonic)

    def guard(self, send: Send) -> Callable[[Message], Awaitable[None]]:
        """``send`` counted for the watchdog: a few attribute writes per send, no task, no timer."""

        async def guarded(message: Message) -> None:
            if self.evicted:
                return  # the watchdog dropped the connection; the stream is ending
            self.in_send = True
            try:
                await send(message)
                # Counted once sent, and without the server's framing: the watchdog may see
                # less taken than was, never more (which would keep a dead client).
                self.written += len(message.get("body", b""))
            finally:
                self.in_send = False
                self.sends += 1

        return guarded

    def stalled(self, now: float, limit: float) -> bool:
        """True when the peer has had bytes waiting and taken none of them for ``limit`` s.

        With the transport: what waits for the peer (asyncio's buffer and the kernel's send
        queue) against what we gave since the last look tells whether it took anything, even
        while our sends go into the kernel's buffer without waiting (small SSE events take
        minutes to fill it). Without: one send waiting ``limit`` s for the buffer to drain."""
        if self.transport is None:
            if not self.in_send or self.sends != self._seen_send:
                self._seen_send, self._progress_at = self.sends, now
            return now - self._progress_at >= limit
        unsent = unsent_bytes(self.transport)
        given, self._seen_written = self.written - self._seen_written, self.written
        taken = self._unsent + given - unsent if self._unsent >= 0 else 0
        self._unsent = unsent
        if unsent == 0 or taken > 0:
            self._progress_at = now
        return now - self._progress_at >= limit

    def evict(self) -> None:
        self.evicted = True
        if self.transport is not None:
            # abort, not close: close() would wait for the peer to take the buffered bytes,
            # which it never will. uvicorn sees the connection lost and ends the response.
            self.transport.abort()

    def record(self, seq: int, now: float) -> None:
        if seq == self.last_seq:
            self.resent += 1
        elif self.last_seq and seq > self.last_seq + 1:
            self.skipped += seq - self.last_seq - 1
        self.last_seq = max(self.last_seq, seq)
        self.sent += 1
        self._rate.add(now)

    @property
    def fps(self) -> float:
        return self._rate.per_second()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "client": self.client,
            "kind": self.kind,
            "res": self.res,
            "fps_cap": self.fps_cap,
            "fps": round(self.fps, 2),
            "sent": self.sent,
            "skipped": self.skipped,
            "resent": self.resent,
            "connected_s": round(time.monotonic() - self.connected, 1),
        }


class Broadcaster:
    """Owned by the app's lifespan: ``attach()`` at start, ``close()`` then ``detach()`` at the end."""

    def __init__(self, hub: FrameHub, loop: asyncio.AbstractEventLoop, nice: int = 0) -> None:
        self.hub = hub
        self._loop = loop
        self._nice = nice
        self._event = asyncio.Event()
        self._waiting = 0  # coroutines in wait_newer; none: a new frame wakes nobody
        self._closed = False
        self._ticker: asyncio.Task[None] | None = None
        # The newest encode asked for at each resolution: viewers who want it share its future.
        self._pending: dict[str, tuple[int, asyncio.Future[Frame]]] = {}
        self._encoders: _Encoders | None = None
        self._ids = itertools.count(1)
        self.viewers: dict[int, Viewer] = {}
        self.subscribers: dict[int, Viewer] = {}
        self.publish_rate = _Rate()
        self.delivered = _Rate(maxlen=65536)
        self.frames_sent = 0
        self.frames_skipped = 0  # of viewers that have left; live ones count in Viewer.skipped
        self.rejected = 0
        self.evicted = 0  # viewers and subscribers dropped for taking no data (STALL_SECONDS)
        # The last SSE result event, encoded once and shared by every subscriber.
        self._shared_event: tuple[Hashable, bytes] | None = None
        # Bumped on the event loop for each change of the service's settings or state, so an
        # event stream knows to send them again; a subscriber compares it with what it sent.
        self.changes = 0
        self._followed: Service | None = None
        # The recorder's notices (new, update, end of an event), each encoded once as an SSE
        # event and numbered on the event loop: a subscriber sends those numbered above its own.
        self.notices = 0
        self._notices: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=NOTICES_KEPT)
        self._encode_notice: Callable[[dict[str, Any]], bytes] | None = None
        self._recorder: Recorder | None = None

    # -- wiring ----------------------------------------------------------------------------------
    def attach(self) -> None:
        self._encoders = _Encoders(self.hub, nice=self._nice)
        self.hub.add_listener(self._listener)
        self._ticker = self._loop.create_task(self._tick())

    def follow(self, service: Service,
               encode_notice: Callable[[dict[str, Any]], bytes] | None = None) -> None:
        """Count (and wake waiters on) the changes of ``service``'s settings and state, and keep
        its recorder's event notices as ``encode_notice`` makes them. Idempotent: called by each
        event stream, the first one subscribes."""
        if self._followed is None:
            self._followed = service
            service.add_listener(self._service_changed)
            recorder = service.recorder
            if recorder is not None and encode_notice is not None:
                self._encode_notice = encode_notice
                self._recorder = recorder
                recorder.listeners.append(self._event_notice)

    def detach(self, deadline: float) -> None:
        if self._followed is not None:
            self._followed.remove_listener(self._service_changed)
            self._followed = None
        if self._recorder is not None:
            if self._event_notice in self._recorder.listeners:
                self._recorder.listeners.remove(self._event_notice)
            self._recorder = None
        self.hub.remove_listener(self._listener)
        if self._encoders is not None:
            self._encoders.stop(deadline)

    def close(self) -> None:
        """End every stream: waiters wake and see ``closed``. Runs on the event loop."""
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
        self._wake()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def encoder_nice(self) -> dict[str, int | None]:
        workers = self._encoders.workers if self._encoders is not None else []
        return {w.name: w.thread_nice for w in workers}

    def _listener(self, seq: int) -> None:
        # The inference thread calls this after each publish: hand off, never block it.
        if seq >= 0:
            self.publish_rate.add(time.monotonic())
            if not self._waiting:
                # Nobody is waiting for a frame: waking the event loop thread would cost a
                # self-pipe write, an epoll round and a new Event per frame for nothing. A waiter
                # counts itself before it looks at the hub, so it cannot miss this frame.
                return
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:
            pass  # the event loop is gone: the server has stopped and nobody is watching

    def _wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def _service_changed(self, what: str) -> None:
        # On the thread that changed the service, holding its lock: hand off, never block.
        _call_soon(self._loop, self._bump_changes)

    def _bump_changes(self) -> None:
        self.changes += 1
        self._wake()

    def _event_notice(self, kind: str, payload: dict[str, Any]) -> None:
        # On the recorder's thread: encoded here, once for every subscriber and off the event
        # loop, then handed off; never blocks the recorder.
        encode = self._encode_notice
        if encode is None:
            return
        try:
            data = encode(payload)
        except Exception:
            log.exception("event notice %s could not be encoded", kind)
            return
        _call_soon(self._loop, self._add_notice, data)

    def _add_notice(self, data: bytes) -> None:
        self.notices += 1
        self._notices.append((self.notices, data))
        self._wake()

    def notice_after(self, number: int) -> tuple[int, bytes | None]:
        """The notice after ``number`` and its own number; ``None`` for its bytes when it is no
        longer kept (the caller missed some: the number returned skips to the oldest kept)."""
        oldest = self._notices[0][0] if self._notices else self.notices + 1
        if number + 1 < oldest:
            return oldest - 1, None
        return self._notices[number + 1 - oldest]  # numbered without holes

    async def _tick(self) -> None:
        # Waiters re-check their deadlines and the shutdown at least this often, without a
        # timer task per wait.
        while not self._closed:
            await asyncio.sleep(TICK)
            self._evict_stalled()
            self._wake()

    def _evict_stalled(self) -> None:
        now = time.monotonic()
        limit = STALL_SECONDS
        for viewer in [*self.viewers.values(), *self.subscribers.values()]:
            if viewer.stalled(now, limit):
                log.info("%s viewer %d from %s took no data for %.0f s: disconnected",
                         viewer.kind, viewer.id, viewer.client, limit)
                viewer.evict()
                self.evicted += 1
                # The slot frees now, whatever the response's unwinding takes.
                self.remove_viewer(viewer)

    # -- waiting ---------------------------------------------------------------------------------
    async def wait_newer(self, seq: int, deadline: float, changes: int | None = None,
                         notices: int | None = None) -> bool:
        """True once the hub has a frame newer than ``seq``; False at ``deadline``, at shutdown,
        or as soon as ``changes`` (if given) is no longer the service's change count or
        ``notices`` (if given) no longer the number of event notices."""
        self._waiting += 1
        try:
            while not self._closed:
                if self.hub.seq > seq and not self.hub.closed:
                    return True
                if changes is not None and changes != self.changes:
                    return False
                if notices is not None and notices != self.notices:
                    return False
                if time.monotonic() >= deadline:
                    return False
                await self._event.wait()
            return False
        finally:
            self._waiting -= 1

    async def sleep_until(self, deadline: float) -> bool:
        """Sleep to ``deadline``; False if the shutdown came first."""
        while not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            await asyncio.sleep(min(remaining, TICK))
        return False

    # -- encoding --------------------------------------------------------------------------------
    async def encoded(self, frame: Frame, res: str) -> Frame:
        """A frame at least as new as ``frame`` with its JPEG at ``res``: one encode, in the
        encoder threads, awaited by everyone who asks."""
        res = frame.effective_res(res)
        if frame.jpeg(res) is not None:
            return frame
        if self._encoders is None:
            raise RuntimeError("the broadcaster is not attached")
        pending = self._pending.get(res)
        if pending is None or pending[0] < frame.seq:
            future = self._encoders.submit(res, frame)
            self._pending[res] = (frame.seq, future)
            future.add_done_callback(lambda done: self._forget(res, done))
        else:
            future = pending[1]
        # shield: a viewer leaving mid-encode must not cancel the frame the others await.
        return await asyncio.shield(future)

    def _forget(self, res: str, future: asyncio.Future[Frame]) -> None:
        pending = self._pending.get(res)
        if pending is not None and pending[1] is future:
            del self._pending[res]

    def shared_event(self, key: Hashable, make: Callable[[], bytes]) -> bytes:
        """``make()``'s bytes, made once for ``key`` and shared by every subscriber that asks
        for the same key (on the event loop: no lock)."""
        shared = self._shared_event
        if shared is not None and shared[0] == key:
            return shared[1]
        data = make()
        self._shared_event = (key, data)
        return data

    # -- viewers ---------------------------------------------------------------------------------
    def add_viewer(self, client: str, res: str, fps_cap: float | None, limit: int,
                   kind: str = "mjpeg") -> Viewer | None:
        table = self.viewers if kind == "mjpeg" else self.subscribers
        if len(table) >= limit:
            self.rejected += 1
            return None
        viewer = Viewer(next(self._ids), client, res, fps_cap, kind)
        table[viewer.id] = viewer
        log.debug("%s viewer %d from %s joined (%d now)", kind, viewer.id, client, len(table))
        return viewer

    def remove_viewer(self, viewer: Viewer) -> None:
        table = self.viewers if viewer.kind == "mjpeg" else self.subscribers
        if table.pop(viewer.id, None) is not None:
            if viewer.kind == "mjpeg":
                self.frames_skipped += viewer.skipped
            log.debug("%s viewer %d left after %d frames", viewer.kind, viewer.id, viewer.sent)
            if not self.viewers and not self.subscribers:
                release_memory()

    def record_sent(self, viewer: Viewer, seq: int) -> None:
        now = time.monotonic()
        viewer.record(seq, now)
        if viewer.kind == "mjpeg":
            self.frames_sent += 1
            self.delivered.add(now)

    @property
    def skipped_total(self) -> int:
        return self.frames_skipped + sum(v.skipped for v in self.viewers.values())
