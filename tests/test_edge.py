"""What one connection may cost (issue 16, points 2 and 3, and SIGHUP from 8), against a real
uvicorn on loopback with raw sockets: a huge request head or URL is refused at once, idle and
slowloris connections are closed, and connections past the open-files limit leave the FIFO and
/health working. Each of these held the server before app/edge.py (commit 9442eee)."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, free_port
from tests.onnx_graphs import classifier
from tests.test_server import TOKEN, running_server

# On the device too: CI runs these again under Python 3.7 on the installed bundle.
pytestmark = pytest.mark.device

# The product closes a connection whose request head is not complete 10 s after it opened (or
# after the head's first byte); a bound for the test, not a speed to meet.
CLOSED_WITHIN = 25.0


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes the connection or ``timeout`` passes."""
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([sock], [], [], 0.2)[0]:
            continue
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        got += data
    return got


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True when the server closed ``sock`` (EOF or reset) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([sock], [], [], 0.2)[0]:
            continue
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
    return False


def status_of(answer: bytes) -> int:
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and answer.startswith(b"HTTP/1.1 ") else 0


class Sender(threading.Thread):
    """Sends ``head`` then ``size`` bytes of ``fill`` in 64 KiB pieces then ``tail``, stopping
    when the server closes; ``sent`` is how far it got."""

    def __init__(self, sock: socket.socket, head: bytes, size: int, tail: bytes,
                 fill: bytes = b"a") -> None:
        super().__init__(name="test-sender", daemon=True)
        self.sock, self.head, self.size, self.tail, self.fill = sock, head, size, tail, fill
        self.sent = 0

    def run(self) -> None:
        piece = self.fill * (64 * 1024)
        with suppress(OSError):
            self.sock.sendall(self.head)
            while self.sent < self.size:
                self.sock.sendall(piece[: self.size - self.sent])
                self.sent += min(len(piece), self.size - self.sent)
            self.sock.sendall(self.tail)


def send_huge(port: int, head: bytes, size: int, tail: bytes, fill: bytes = b"a") -> bytes:
    with connect(port) as sock:
        sender = Sender(sock, head, size, tail, fill)
        sender.start()
        answer = read_until_closed(sock, 60)
        sender.join(60)
        assert not sender.is_alive()
    return answer


def get(port: int, path: str = "/health", headers: bytes = b"") -> int:
    with connect(port) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     + headers + b"\r\n")
        return status_of(read_until_closed(sock, 20))


# -- point 2: head and URL size ---------------------------------------------------------------
def test_a_huge_request_head_is_refused_with_431_at_once_and_closed() -> None:
    """Before: any head was read whole, at a quadratic cost (64 MB: 12.9 s, the loop at x0.21),
    and answered 200; an unfinished one was waited for forever."""
    with running_server() as srv:
        port = srv.thread.port
        # Past the limit and never finished: answered without waiting for the rest.
        with connect(port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (256 * 1024))
            answer = read_until_closed(sock, 15)
        assert status_of(answer) == 431, answer[:200]
        assert answer.endswith(b"\n") and b"connection: close" in answer.lower()
        # A whole 16 MB head, and a head of many small headers: 431, the connection closed.
        answer = send_huge(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ", 16 << 20, b"\r\n\r\n")
        assert status_of(answer) == 431, answer[:200]
        answer = send_huge(port, b"GET /health HTTP/1.1\r\nHost: x\r\n", 2 << 20, b"\r\n",
                           fill=b"X-A: b\r\n")
        assert status_of(answer) == 431, answer[:200]
        # What a browser may send (a large Cookie header) is still served, and so is the rest.
        assert get(port, headers=b"Cookie: " + b"c=" + b"v" * (40 * 1024) + b"\r\n") == 200
        assert get(port) == 200
        srv.wait_frames(3)
        # counted where an operator looks: /api/stats and /metrics
        with srv.client() as client:
            assert client.get("/api/stats").json()["connections"]["head_too_large"] == 3
            metrics = client.get("/metrics").text
        assert 'deeplens_connections_refused_total{reason="head_too_large"} 3.0' in metrics


def test_a_huge_url_is_refused_with_414_at_once_and_closed() -> None:
    with running_server() as srv:
        port = srv.thread.port
        with connect(port) as sock:
            sock.sendall(b"GET /health?x=" + b"a" * (64 * 1024))
            answer = read_until_closed(sock, 15)
        assert status_of(answer) == 414, answer[:200]
        answer = send_huge(port, b"GET /health?x=", 16 << 20, b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(answer) == 414, answer[:200]
        # A long URL in one packet with the whole request: refused too, the app never called.
        assert get(port, "/health?x=" + "a" * 9000) == 414
        assert get(port, "/health?x=" + "a" * 6000) == 200
        assert get(port) == 200
        srv.wait_frames(3)


# -- point 3: idle and slowloris connections, the cap ---------------------------------------------
def test_idle_slowloris_and_kept_alive_connections_are_closed_but_streams_are_not() -> None:
    """Before: 500 idle and 200 slowloris sockets were held for as long as their clients liked."""
    with running_server() as srv:
        port = srv.thread.port
        stream = connect(port)
        stream.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")
        idle = [connect(port) for _ in range(100)]
        slow = [connect(port) for _ in range(30)]
        for sock in slow:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        kept = connect(port)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first or not first.rstrip().endswith(b"}"):
            assert select.select([kept], [], [], 10)[0], first
            first += kept.recv(65536)
        assert status_of(first) == 200
        open_ = {s.fileno(): s for s in idle + slow + [kept]}
        answers: dict[int, bytes] = {}
        streamed = 0
        deadline = time.monotonic() + CLOSED_WITHIN
        next_drip = time.monotonic()
        try:
            while open_ and time.monotonic() < deadline:
                if time.monotonic() >= next_drip:  # slowloris: one more header byte a second
                    next_drip += 1.0
                    for sock in slow:
                        if sock.fileno() in open_:
                            with suppress(OSError):
                                sock.sendall(b"X")
                readable, _, _ = select.select([*open_.values(), stream], [], [], 0.2)
                for sock in readable:
                    try:
                        data = sock.recv(65536)
                    except ConnectionResetError:
                        data = b""
                    if sock is stream:
                        streamed += len(data)
                    elif data:
                        answers[sock.fileno()] = answers.get(sock.fileno(), b"") + data
                    else:
                        del open_[sock.fileno()]
            assert not open_, f"{len(open_)} idle, slowloris or kept-alive connections still open"
            assert all(status_of(answers.get(s.fileno(), b"")) == 408 for s in slow), \
                "a slowloris connection is told why (408)"
            assert not any(s.fileno() in answers for s in idle), "an idle one is just closed"
            # The stream is a long-lived connection, not an idle one: it still flows.
            assert streamed > 0
            before = streamed
            end = time.monotonic() + 20
            while streamed < before + 100_000 and time.monotonic() < end:
                if select.select([stream], [], [], 0.5)[0]:
                    streamed += len(stream.recv(65536))
            assert streamed >= before + 100_000, "the stream stopped"
            assert get(port) == 200
        finally:
            for sock in idle + slow + [kept, stream]:
                sock.close()


def test_past_the_cap_a_new_connection_takes_an_idle_ones_slot_else_gets_503() -> None:
    from app.edge import EdgeLimits
    from app.server import ServerThread, create_server
    from inference.service import Service
    from tests.test_server import fake_model_factory, server_settings

    service = Service(server_settings(), model_factory=fake_model_factory)
    service.start()
    thread = ServerThread(create_server(service, limits=EdgeLimits(max_connections=4)))
    socks: list[socket.socket] = []
    try:
        thread.start()
        port = thread.port
        socks += [connect(port) for _ in range(4)]
        time.sleep(0.2)  # accepted, in order
        # A fifth: the one idle longest is closed to make room.
        assert get(port) == 200
        assert closed_by_server(socks[0], 5)
        # Four streams fill the cap: nothing idle to close, so a new connection is refused.
        streams = [connect(port) for _ in range(4)]
        socks += streams
        for sock in streams:
            sock.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")
            assert select.select([sock], [], [], 10)[0]
        with connect(port) as late:
            answer = read_until_closed(late, 10)
        assert status_of(answer) == 503, answer
        counts = thread.server.app.state.edge.stats()
        assert counts["max_connections"] == 4 and counts["refused_full"] >= 1
        assert counts["evicted"] >= 4  # the first five plus each stream's own connection
        for sock in socks:
            sock.close()
        end = time.monotonic() + 10
        while get(port) != 200:  # the streams' slots free once the server sees them closed
            assert time.monotonic() < end
            time.sleep(0.1)
    finally:
        for sock in socks:
            sock.close()
        thread.stop(time.monotonic() + 2.0)
        service.stop()


# -- the process, with a device-like open-files limit ---------------------------------------------
class FifoReader(threading.Thread):
    """Reads the project-stream FIFO, counting JPEG starts; stops on ``stop`` or EOF."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="test-fifo-reader", daemon=True)
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.frames = 0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if select.select([self.fd], [], [], 0.2)[0]:
                    data = os.read(self.fd, 1 << 20)
                    self.frames += data.count(b"\xff\xd8\xff")
        finally:
            os.close(self.fd)

    def more(self, count: int, timeout: float = 20.0) -> bool:
        target = self.frames + count
        deadline = time.monotonic() + timeout
        while self.frames < target and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.frames >= target


def _limit_open_files(limit: int) -> Any:
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


@contextmanager
def dashboard_process(tmp_path: Path, *args: str, files: int | None = None) -> Iterator[Any]:
    model = tmp_path / "tiny.onnx"
    model.write_bytes(classifier())
    fifo = tmp_path / "results.mjpeg"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPLENS_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", *args, "--host", "127.0.0.1", "--port", str(port), "--token",
         TOKEN, "--source", "synthetic:320x180@20", "--model", str(model), "--model-type",
         "classification", "--fifo", str(fifo), "--iot", "off"],
        cwd=ROOT, env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=_limit_open_files(files) if files else None)
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr or []), name="cli-stderr",
                             daemon=True)
    drain.start()
    reader: FifoReader | None = None
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, "".join(err)
            assert time.monotonic() < deadline, "".join(err)
            with suppress(OSError, httpx.HTTPError):
                if fifo.exists() and httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).is_success:
                    break
            time.sleep(0.1)
        reader = FifoReader(fifo)
        reader.start()
        assert reader.more(5), "the FIFO delivers frames"
        yield proc, port, reader, err
    finally:
        if reader is not None:
            reader.stop.set()
            reader.join(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        drain.join(5)
        if proc.stderr is not None:
            proc.stderr.close()


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_more_connections_than_the_open_files_limit_leave_the_fifo_and_health_working(
        tmp_path: Path) -> None:
    """Before: with the open-files limit at 256, 400 sockets left accept failing with "Too many
    open files": /health unanswered (the connection never accepted) for as long as they stayed."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("counts the server's descriptors in /proc")
    with dashboard_process(tmp_path, files=256) as (proc, port, reader, err):
        stream = connect(port)
        stream.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")
        assert select.select([stream], [], [], 10)[0]
        flood: list[socket.socket] = []
        try:
            for _ in range(400):
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            most = 0
            for _ in range(5):  # /health answered each time, while the flood stays open
                most = max(most, open_descriptors(proc.pid))
                assert get(port) == 200
                assert reader.more(3), "the FIFO stopped delivering"
                most = max(most, open_descriptors(proc.pid))
            assert most < 256, most
            # The stream, opened before the flood, is not idle: it still flows.
            got = 0
            end = time.monotonic() + 20
            while got < 100_000 and time.monotonic() < end:
                if select.select([stream], [], [], 0.5)[0]:
                    got += len(stream.recv(65536))
            assert got >= 100_000
        finally:
            for sock in flood:
                sock.close()
            stream.close()
        assert get(port) == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    log = "".join(err)
    assert "open connections (open-files limit 256" in log, log
    assert "Too many open files" not in log and "Traceback" not in log, log


# -- SIGHUP (point 8) -----------------------------------------------------------------------------
def test_sighup_stops_the_dashboard_gracefully_with_exit_0(tmp_path: Path) -> None:
    """Before: SIGHUP (a closed terminal or ssh session) killed the process: no graceful stop."""
    with dashboard_process(tmp_path) as (proc, port, reader, err):
        stream = connect(port)
        stream.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert select.select([stream], [], [], 10)[0]
            proc.send_signal(signal.SIGHUP)
            assert proc.wait(5) == 0
            assert closed_by_server(stream, 5), "the stream was ended"
        finally:
            stream.close()
    assert "Traceback" not in "".join(err)


def test_sighup_stops_infer_gracefully_with_exit_0(tmp_path: Path) -> None:
    model = tmp_path / "tiny.onnx"
    model.write_bytes(classifier())
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPLENS_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "infer", "--source", "synthetic:64x64@20", "--frames", "100000",
         "--model", str(model), "--model-type", "classification"],
        cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("{")  # inferring
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
