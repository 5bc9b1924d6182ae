"""Shared pieces of the benchmarks: the real server in a subprocess, raw-socket clients in other
processes, mosquitto, an ffmpeg FIFO reader, a model-only worker and the statistics.

Everything here binds 127.0.0.1 only, every loop is bounded by a deadline, and every process
started is stopped in a ``finally`` (context managers).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
# The product tree the benchmarked dashboards run from: this checkout, or BENCH_PRODUCT (another
# checkout, to measure two versions of the code with the same benchmark).
PRODUCT = Path(os.environ.get("BENCH_PRODUCT") or ROOT)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from inference.settings import Settings  # noqa: E402

MODEL = "efficientnet-lite0"
# ONNX Runtime intra-op threads: on 2 shared cores, 1 thread is faster than 2. BENCH_THREADS=N
# runs every configuration (server, model-only, the seed) with N instead (0: the product's auto
# rule, which is 1 on 2 CPUs; 2 reproduces bench/README fix 12's run); an environment variable
# so that the worker processes see it too.
THREADS = str(int(os.environ.get("BENCH_THREADS", "1")))
TOP_K = Settings().top_k  # the dashboard's default --top-k, which every benchmark's server runs
SYNTHETIC_720P = "synthetic:1280x720@30"
_SEQ = re.compile(rb"X-Frame-Seq: (\d+)")
_TS = re.compile(rb"X-Timestamp: ([0-9.]+)")
_SSE_ID = re.compile(rb"^id: (\d+)", re.M)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks that stop what we started


if __name__ != "__mp_main__" and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def demo_clip() -> str:
    from inference.sources.video import demo_clip as clip

    return str(clip())


def child_env(product: Path = PRODUCT) -> dict[str, str]:
    """The environment of the processes we start: the product tree first on the path."""
    path = os.pathsep.join(p for p in (str(product), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    load = os.getloadavg()
    return (f"{os.cpu_count()} x {cpu}, Python {platform.python_version()}, "
            f"load average {load[0]:.1f}")


# -- process accounting ----------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def process_snapshot(pid: int) -> dict[str, float]:
    proc = psutil.Process(pid)
    return {"rss_mb": proc.memory_info().rss / 2**20, "threads": proc.num_threads(),
            "fds": proc.num_fds()}


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the dashboard ---------------------------------------------------------------------------------
@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict[str, Any]:
        return dict(get_json(self.base + "/api/stats"))

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)


@contextlib.contextmanager
def dashboard(source: str, *extra: str, min_published: int = 30,
              timeout: float = 120.0, product: Path = PRODUCT, **popen: Any) -> Iterator[Server]:
    """``python -m app`` of ``product`` on 127.0.0.1 with ``source``; yields once it publishes
    steadily. ``popen``: more arguments for the process (a ``preexec_fn``, ``stderr``)."""
    port = free_port()
    cmd = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port),
           "--source", source, "--model", MODEL, "--threads", THREADS,
           "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=product, env=child_env(product), **popen)
    server = Server(proc, port)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                if int(server.stats()["published"]) >= min_published:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not start: {' '.join(cmd)}")
            time.sleep(0.2)
        yield server
    finally:
        stop_process(proc)


# -- mosquitto and ffmpeg --------------------------------------------------------------------------
@contextlib.contextmanager
def mosquitto() -> Iterator[tuple[int, int]]:
    """A private mosquitto on 127.0.0.1:PORT; yields (port, pid)."""
    if not shutil.which("mosquitto"):
        raise RuntimeError("mosquitto is not installed")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not start")
                time.sleep(0.05)
            yield port, proc.pid
        finally:
            stop_process(proc)


@contextlib.contextmanager
def ffmpeg_reader(fifo: str) -> Iterator[subprocess.Popen[bytes]]:
    """A real reader of the project-stream FIFO: ``ffmpeg -f mjpeg -i FIFO -f null -``."""
    proc = subprocess.Popen(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "mjpeg", "-i", fifo, "-f", "null", "-"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        stop_process(proc, 5.0)


# -- HTTP stream clients (run in client processes) -------------------------------------------------
class ChunkedParts:
    """Parses an HTTP/1.1 chunked streaming response on a raw socket. Each chunk is one MJPEG
    part (or one SSE event): uvicorn sends each body message as one chunk. ``feed`` returns the
    first bytes (headers) of every chunk completed by ``data``; the rest of a part is skipped
    without copying it."""

    PREFIX = 256

    def __init__(self) -> None:
        self.status = 0
        self._head_done = False
        self._pending = b""
        self._state = "size"
        self._remaining = 0
        self._prefix = b""
        self._crlf = 0
        self.bytes = 0
        self.ended = False

    def feed(self, data: bytes) -> list[bytes]:
        done: list[bytes] = []
        self.bytes += len(data)
        buf = self._pending + data if self._pending else data
        self._pending = b""
        pos, n = 0, len(buf)
        if not self._head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._pending = buf
                return done
            first = buf[:buf.find(b"\r\n")]
            self.status = int(first.split()[1]) if len(first.split()) > 1 else 0
            self._head_done = True
            pos = end + 4
        while pos < n and not self.ended:
            if self._state == "size":
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    self._pending = buf[pos:]
                    return done
                size = int(buf[pos:end].split(b";")[0] or b"0", 16)
                pos = end + 2
                if size == 0:
                    self.ended = True
                    break
                self._remaining, self._prefix, self._state = size, b"", "data"
            elif self._state == "data":
                take = min(self._remaining, n - pos)
                if len(self._prefix) < self.PREFIX:
                    self._prefix += buf[pos:pos + min(take, self.PREFIX - len(self._prefix))]
                self._remaining -= take
                pos += take
                if self._remaining == 0:
                    done.append(self._prefix)
                    self._state, self._crlf = "crlf", 2
            else:
                take = min(self._crlf, n - pos)
                self._crlf -= take
                pos += take
                if self._crlf == 0:
                    self._state = "size"
        return done


def part_seq_ts(prefix: bytes) -> tuple[int, float]:
    seq = _SEQ.search(prefix)
    ts = _TS.search(prefix)
    return (int(seq.group(1)) if seq else -1, float(ts.group(1)) if ts else 0.0)


def open_stream(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    sock.setblocking(False)
    return sock


def _stopped(stop: Any) -> bool:
    return stop is not None and stop.is_set()


def viewers_process(port: int, path: str, count: int, t0: float, t1: float, out: Any,
                    latency: bool = False, stop: Any = None) -> None:
    """``count`` MJPEG viewers on raw sockets in this process, multiplexed with a selector.

    For each: parts and bytes completed in the wall-clock window [t0, t1], distinct seqs, and
    (``latency``) for every part completed in the window, receive time minus its X-Timestamp, and
    the (seq, receive time) pairs. ``stop`` (an Event) ends the window early.
    """
    sel = selectors.DefaultSelector()
    parsers = [ChunkedParts() for _ in range(count)]
    socks = []
    try:
        for i in range(count):
            sock = open_stream(port, path)
            sel.register(sock, selectors.EVENT_READ, i)
            socks.append(sock)
        parts = [0] * count
        nbytes = [0] * count
        seqs: list[set[int]] = [set() for _ in range(count)]
        lat: list[list[float]] = [[] for _ in range(count)]
        arrivals: list[list[tuple[int, float]]] = [[] for _ in range(count)]
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while time.time() < t1 + 0.3 and not _stopped(stop):
            for key, _ in sel.select(timeout=0.2):
                i = key.data
                try:
                    n = key.fileobj.recv_into(buf)  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    n = 0
                if n == 0:
                    sel.unregister(key.fileobj)
                    continue
                now = time.time()
                done = parsers[i].feed(view[:n].tobytes())
                if t0 <= now <= t1:
                    nbytes[i] += n
                    for prefix in done:
                        parts[i] += 1
                        seq, ts = part_seq_ts(prefix)
                        seqs[i].add(seq)
                        if latency:
                            lat[i].append(now - ts)
                            arrivals[i].append((seq, now))
        out.put([{"parts": parts[i], "bytes": nbytes[i], "status": parsers[i].status,
                  "distinct": len(seqs[i]), "latency": lat[i], "arrivals": arrivals[i]}
                 for i in range(count)])
    finally:
        for sock in socks:
            sock.close()


def start_viewers(port: int, path: str, viewers: int, t0: float, t1: float,
                  latency: bool = False, max_procs: int = 4,
                  stop: Any = None) -> tuple[list[Any], Any]:
    """Spread ``viewers`` over up to ``max_procs`` client processes; returns (procs, queue)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = []
    if viewers:
        nprocs = min(viewers, max_procs)
        shares = [viewers // nprocs + (1 if i < viewers % nprocs else 0) for i in range(nprocs)]
        for i, share in enumerate(shares):
            p = ctx.Process(target=viewers_process, name=f"viewers-{i}",
                            args=(port, path, share, t0, t1, out, latency, stop), daemon=True)
            p.start()
            procs.append(p)
    return procs, out


def collect_viewers(procs: list[Any], out: Any, timeout: float = 60.0) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    try:
        for _ in procs:
            results.extend(out.get(timeout=timeout))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join()
    return results


def sse_process(port: int, t0: float, t1: float, out: Any, stop: Any = None) -> None:
    """One ``/results/events`` subscriber: events in [t0, t1] and each event's JSON by seq."""
    parser = ChunkedParts()
    parser.PREFIX = 1 << 16  # keep the whole event: it is small
    events: dict[int, Any] = {}
    count = 0
    sock = open_stream(port, "/results/events")
    try:
        sock.setblocking(True)
        sock.settimeout(0.5)
        while time.time() < t1 + 0.3 and not _stopped(stop):
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not data:
                break
            now = time.time()
            for chunk in parser.feed(data):
                if not chunk.startswith(b"id: ") or not t0 <= now <= t1:
                    continue
                count += 1
                body = chunk.split(b"data: ", 1)[1] if b"data: " in chunk else b"{}"
                with contextlib.suppress(ValueError):
                    item = json.loads(body)
                    events[int(item["seq"])] = {"timestamp": item["timestamp"],
                                                "timings_ms": item["timings_ms"]}
        out.put({"events": count, "status": parser.status, "by_seq": events})
    finally:
        sock.close()


def poll_results_process(port: int, rate: float, t0: float, t1: float, out: Any,
                         stop: Any = None, timeout: float = 10.0) -> None:
    """Polls ``/results`` at ``rate`` per second on a keep-alive connection (as the page does).
    After a stall (a stopped server) it resumes at ``rate``, without a burst to catch up."""
    import http.client

    def connect() -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def get(conn: http.client.HTTPConnection) -> int:
        conn.request("GET", "/results")
        response = conn.getresponse()
        response.read()
        return response.status

    conn = connect()
    used = False  # a request has gone over this connection: the server may have closed it idle
    ok = errors = reconnects = 0
    try:
        next_at = time.time()
        while time.time() < t1 and not _stopped(stop):
            try:
                try:
                    status = get(conn)
                except (ConnectionError, http.client.RemoteDisconnected):
                    if not used:
                        raise
                    # A keep-alive connection the server closed while idle (uvicorn after
                    # --timeout-keep-alive; here also as a stopped server resumes): retry once on
                    # a new one, as browsers and HTTP libraries do for an idempotent GET.
                    reconnects += 1
                    conn.close()
                    conn = connect()
                    status = get(conn)
                used = True
                if status == 200:
                    ok += 1
                else:
                    errors += 1
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
                conn, used = connect(), False
            next_at = max(next_at + 1.0 / rate, time.time())
            time.sleep(max(0.0, next_at - time.time()))
        out.put({"ok": ok, "errors": errors, "reconnects": reconnects})
    finally:
        conn.close()


# -- model-only ------------------------------------------------------------------------------------
def thread_sched(pid: int, tid: int) -> tuple[float, float]:
    """A thread's (seconds on a CPU, seconds runnable but waiting for one) from the kernel's
    schedstat (Linux). Wall time minus both is time it slept: the GIL, a lock, its source."""
    fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
    return int(fields[0]) / 1e9, int(fields[1]) / 1e9


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def loop_breakdown(s0: tuple[float, float], s1: tuple[float, float], frames: int,
                   elapsed: float) -> dict[str, float]:
    """Where the loop thread's time per frame went, in ms: on a CPU, waiting for one, asleep."""
    n = max(frames, 1)
    cpu, runq = (s1[0] - s0[0]) * 1000 / n, (s1[1] - s0[1]) * 1000 / n
    frame = elapsed * 1000 / n
    return {"loop_frame_ms": frame, "loop_cpu_ms": cpu, "loop_runq_ms": runq,
            "loop_sleep_ms": max(0.0, frame - cpu - runq)}


def model_step(model: Any, frame: Any) -> Any:
    """One frame of the model's own work, as the dashboard's loop does it: preprocess, infer and
    the parse cut to the dashboard's top-k (``parse_top``: only those entries are built)."""
    return model.parse_top(model.infer(model.preprocess(frame)), TOP_K)


def model_only_worker(source: str, source_fps: float | None, warmup: float,
                      window: float) -> dict[str, float]:
    """Read the source, preprocess, infer and parse (``model_step``) in a plain loop: the model's
    own pace on the same frames, with nothing else. Returns fps and this process's CPU % over the
    window."""
    from inference.models import load_model
    from inference.sources import make_source

    model = load_model(Settings(model=MODEL, threads=int(THREADS)))
    src = make_source(source, fps=source_fps)
    src.open()
    me = psutil.Process()
    try:
        end_warm = time.monotonic() + warmup
        while time.monotonic() < end_warm:
            frame = src.read()
            if frame is not None:
                model_step(model, frame)
        tid = threading.get_native_id()
        cpu0, t0, frames = sum(me.cpu_times()[:2]), time.monotonic(), 0
        sched0 = thread_sched(os.getpid(), tid)
        pipeline_ms: list[float] = []  # per frame, as the dashboard's timings_ms count it
        while time.monotonic() - t0 < window:
            frame = src.read()
            if frame is None:
                continue
            started = time.perf_counter()
            model_step(model, frame)
            pipeline_ms.append((time.perf_counter() - started) * 1000.0)
            frames += 1
        elapsed = time.monotonic() - t0
        sched1 = thread_sched(os.getpid(), tid)
        cpu = sum(me.cpu_times()[:2]) - cpu0
    finally:
        src.close()
    return {"fps": frames / elapsed, "cpu_percent": 100.0 * cpu / elapsed,
            "pipeline_p50_ms": percentile(pipeline_ms, 50),
            "pipeline_p99_ms": percentile(pipeline_ms, 99),
            **loop_breakdown(sched0, sched1, frames, elapsed)}


def run_model_only(source: str, source_fps: float | None, warmup: float, window: float) -> dict[str, float]:
    """model_only_worker in a fresh process (as isolated as the server it is compared with)."""
    code = ("import json, sys; from bench.common import model_only_worker; "
            f"print(json.dumps(model_only_worker({source!r}, {source_fps!r}, {warmup!r}, {window!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=child_env(), timeout=warmup + window + 120,
                         check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))
