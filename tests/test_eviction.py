"""Viewers and SSE subscribers whose sockets take no data are evicted and their slots freed;
a slow reader that keeps taking data is not; SSE result events are encoded once per event.

Real uvicorn on 127.0.0.1 (``running_server``), raw sockets with a tiny receive buffer so the
server's buffers fill fast. Every wait is bounded; no speed is asserted.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest

from app.broadcast import Broadcaster
from tests.test_server import PartReader, Running, running_server

# The tests shorten the stall limit so they run in seconds; the product's value is longer
# (app/broadcast.py STALL_SECONDS says why).
TEST_STALL = 2.0


def broadcaster(srv: Running) -> Broadcaster:
    found: Broadcaster = srv.thread.server.app.state.broadcaster
    return found


def wait_until(predicate: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.05)


@contextmanager
def raw_request(srv: Running, path: str, rcvbuf: int = 2048) -> Iterator[socket.socket]:
    """A connection that sent ``GET path`` and reads only what the caller reads."""
    host, port = srv.url.split("//", 1)[1].split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Before connect, so the window the server sees is small from the first segment.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect((host, int(port)))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        yield sock
    finally:
        sock.close()


def status_of(srv: Running, path: str) -> int:
    """The status a new client gets now; a 200 must also deliver its first part or event."""
    with httpx.Client(base_url=srv.url, timeout=10) as client, client.stream("GET", path) as response:
        if response.status_code == 200:
            if path.startswith("/stream"):
                PartReader(response.iter_bytes()).next()
            else:
                assert any(line.startswith("event: result") for line in response.iter_lines())
        return response.status_code


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server has dropped the connection (EOF or reset), reading what is left."""
    deadline = time.monotonic() + timeout
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            continue
        except OSError:  # ECONNRESET: the server aborted the connection
            return True
    return False


def test_viewers_and_subscribers_that_never_read_are_evicted_and_a_new_one_gets_in(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("app.broadcast.STALL_SECONDS", TEST_STALL, raising=False)
    # At 30 events/s of a few hundred bytes, the server's socket buffers would take half a
    # minute to fill: a subscriber must be found out by what its socket takes, not by our
    # sends blocking.
    with running_server(source="synthetic:640x360@30", max_viewers=2) as srv, ExitStack() as stack:
        bc = broadcaster(srv)
        stuck = [stack.enter_context(raw_request(srv, path))
                 for path in ("/stream.mjpg", "/stream.mjpg", "/results/events", "/results/events")]
        wait_until(lambda: len(bc.viewers) == 2 and len(bc.subscribers) == 2, "the 4 connections", 10)
        assert status_of(srv, "/stream.mjpg") == 503
        assert status_of(srv, "/results/events") == 503
        full = time.monotonic()
        # Bounded: the clients' receive windows close at once, then TEST_STALL with nothing
        # taken, then a watchdog tick.
        for path in ("/stream.mjpg", "/results/events"):
            wait_until(lambda p=path: status_of(srv, p) == 200, f"a slot on {path}", 20)  # type: ignore[misc]
        freed_after = time.monotonic() - full
        assert bc.evicted >= 4, bc.evicted
        with srv.client() as client:  # where an operator sees it
            assert client.get("/api/stats").json()["viewers_evicted"] == bc.evicted
            assert f"deeplens_viewers_evicted_total {float(bc.evicted)}" in client.get("/metrics").text
        print(f"slots freed {freed_after:.1f} s after the cap was full")
        # Dropped, not just forgotten: the server's socket (and what it buffered) is gone too.
        assert all(closed_by_server(sock, 10) for sock in stuck)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


def test_a_slow_reader_that_keeps_taking_frames_is_not_evicted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.broadcast.STALL_SECONDS", TEST_STALL, raising=False)
    with running_server(source="synthetic:640x360@30", max_viewers=1) as srv, \
            raw_request(srv, "/stream.mjpg", rcvbuf=4096) as sock:
        bc = broadcaster(srv)
        wait_until(lambda: len(bc.viewers) == 1, "the viewer", 10)
        (viewer,) = bc.viewers.values()
        received = bytearray()
        # ~10 KB/s: far slower than the stream, a frame every few seconds, and each send waits
        # longer than TEST_STALL for the buffers to drain; it keeps taking bytes all along.
        end = time.monotonic() + 4 * TEST_STALL + 3
        while time.monotonic() < end:
            data = sock.recv(1024)
            assert data, "the server closed the slow reader's connection"
            received += data
            time.sleep(0.1)
        assert bc.viewers.get(viewer.id) is viewer, "the slow reader was evicted"
        assert received.count(b"--frame\r\n") >= 2, len(received)
        assert getattr(bc, "evicted", 0) == 0


def test_sse_result_events_are_encoded_once_per_event_for_all_subscribers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import app.routes.results as results

    encodes: Counter[int] = Counter()
    event = results._event

    def counting(data: dict[str, Any], seq: int) -> bytes:
        encodes[seq] += 1
        return event(data, seq)

    monkeypatch.setattr(results, "_event", counting)
    with running_server(source="synthetic:64x36@30") as srv:
        seen: list[list[int]] = []

        def subscribe() -> None:
            ids: list[int] = []
            with httpx.Client(base_url=srv.url, timeout=10) as client, \
                    client.stream("GET", "/results/events") as response:
                for line in response.iter_lines():
                    if line.startswith("id:"):
                        ids.append(int(line.split(":", 1)[1]))
                        if len(ids) == 15:
                            break
            seen.append(ids)

        threads = [threading.Thread(target=subscribe, name=f"sse{i}") for i in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(seen) == 5 and all(len(ids) == 15 for ids in seen)
    delivered = Counter(seq for ids in seen for seq in ids)
    shared = [seq for seq, n in delivered.items() if n >= 2]
    assert len(shared) >= 5, delivered  # the same events went to several subscribers
    assert max(encodes[seq] for seq in shared) == 1, {seq: encodes[seq] for seq in shared}
