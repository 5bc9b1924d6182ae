"""MJPEG fan-out: the dashboard's encode-once stream vs a per-viewer-encode baseline, same run.

    python bench/fanout.py [--viewers 1,5,20,50] [--window 8] [--warmup 2]

For each viewer count, each server runs in its own process (source synthetic 1280x720@30,
overlay on, EfficientNet-Lite0 on one thread) and viewers read ``?res=720p`` from separate client
processes over raw sockets. Measured over the window: the server process's CPU (psutil
cpu_times, all threads), each viewer's fps (parts received), JPEG encodes per second and the
source fps; plus the dashboard's encodes with no viewer at all. The baseline is
bench/baseline_server.py (a sync generator per viewer calling cv2.imencode, as tutorials do).

Targets: dashboard CPU at 50 viewers <= 1.5 x CPU at 1; every viewer >= 95 % of the source fps;
zero encodes with no consumer. Writes bench/README_fanout.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import selectors
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "synthetic:1280x720@30"
MODEL = "efficientnet-lite0"
SEQ_HEADER = b"X-Frame-Seq: "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


# -- servers ---------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    stream_path: str
    stats_path: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def counters(self) -> tuple[int, int]:
        """(JPEG encodes so far, frames published so far)."""
        stats = get_json(self.base + self.stats_path)
        if self.name == "dashboard":
            return int(stats["jpeg"]["encodes_total"]), int(stats["published"])
        return int(stats["encodes"]), int(stats["published"])

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)


@contextmanager
def start_server(name: str) -> Iterator[Server]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if name == "dashboard":
        cmd = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port),
               "--source", SOURCE, "--model", MODEL, "--threads", "1", "--overlay", "on",
               "--display-res", "720p", "--max-viewers", "500", "--fifo", "off", "--iot", "off",
               "--log-level", "warning"]
        server = Server(name, subprocess.Popen(cmd, cwd=ROOT, env=env), port,
                        "/stream.mjpg?res=720p", "/api/stats")
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "baseline_server.py"), "--port", str(port),
               "--source", SOURCE, "--model", MODEL, "--threads", "1"]
        server = Server(name, subprocess.Popen(cmd, cwd=ROOT, env=env), port, "/video_feed", "/stats")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if server.counters()[1] > 30:  # up and publishing steadily
                    break
            except OSError:
                pass
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} server did not start")
            time.sleep(0.2)
        yield server
    finally:
        server.proc.terminate()
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


# -- viewers ---------------------------------------------------------------------------------------
def viewer_process(port: int, path: str, count: int, t0: float, t1: float, out: Any) -> None:
    """``count`` viewers on raw sockets, multiplexed; each counts the parts it gets in [t0, t1]."""
    sel = selectors.DefaultSelector()
    socks = []
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, i)
        socks.append(sock)
    in_window = [0] * count
    seqs: list[list[int]] = [[] for _ in range(count)]
    tails = [b""] * count
    status_ok = [False] * count
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while time.time() < t1 + 0.2:
        for key, _ in sel.select(timeout=0.2):
            i = key.data
            try:
                n = key.fileobj.recv_into(buf)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            if n == 0:
                sel.unregister(key.fileobj)
                continue
            now = time.time()
            # Only the seq headers matter; keep a short tail so one split across reads is found.
            data = tails[i] + bytes(view[:n]) if tails[i] else view[:n].tobytes()
            if not status_ok[i] and data.startswith(b"HTTP/1.1 200"):
                status_ok[i] = True
            start = 0
            while (at := data.find(SEQ_HEADER, start)) >= 0:
                end = data.find(b"\r\n", at)
                if end < 0:
                    break
                if t0 <= now <= t1:
                    in_window[i] += 1
                    seqs[i].append(int(data[at + len(SEQ_HEADER):end]))
                start = end
            tails[i] = data[-64:] if start < len(data) - 64 else data[start:]
    for sock in socks:
        sock.close()
    out.put([{"parts": in_window[i], "ok": status_ok[i], "distinct": len(set(seqs[i]))}
             for i in range(count)])


@dataclass
class Point:
    server: str
    viewers: int
    cpu_percent: float
    source_fps: float
    encodes_per_s: float
    fps_median: float
    fps_min: float
    refused: int

    @property
    def cpu_ms_per_frame(self) -> float:
        """CPU per source frame: comparable across points when a busy machine slows the source."""
        return 10.0 * self.cpu_percent / self.source_fps if self.source_fps else 0.0

    @property
    def min_ratio(self) -> float:
        return self.fps_min / self.source_fps if self.source_fps else 0.0


def measure(server: Server, viewers: int, warmup: float, window: float) -> Point:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    t0 = time.time() + warmup + 1.0  # +1 s for the client processes to start
    t1 = t0 + window
    procs = []
    if viewers:
        nprocs = min(viewers, 4)
        shares = [viewers // nprocs + (1 if i < viewers % nprocs else 0) for i in range(nprocs)]
        for i, share in enumerate(shares):
            p = ctx.Process(target=viewer_process, name=f"viewers-{i}",
                            args=(server.port, server.stream_path, share, t0, t1, out))
            p.start()
            procs.append(p)
    time.sleep(max(0.0, t0 - time.time()))
    cpu0, (enc0, pub0), w0 = server.cpu_seconds(), server.counters(), time.time()
    time.sleep(max(0.0, t1 - time.time()))
    cpu1, (enc1, pub1), w1 = server.cpu_seconds(), server.counters(), time.time()
    elapsed = w1 - w0
    results: list[dict[str, Any]] = []
    for _ in procs:
        results.extend(out.get(timeout=60))
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.terminate()
            p.join()
    fps = [r["parts"] / window for r in results if r["ok"]]
    refused = sum(1 for r in results if not r["ok"])
    return Point(
        server.name, viewers, 100.0 * (cpu1 - cpu0) / elapsed, (pub1 - pub0) / elapsed,
        (enc1 - enc0) / elapsed, statistics.median(fps) if fps else 0.0,
        min(fps) if fps else 0.0, refused,
    )


# -- report ----------------------------------------------------------------------------------------
def table(points: list[Point]) -> str:
    rows = ["| server | viewers | server CPU % | CPU ms / frame | source fps | viewer fps median "
            "| viewer fps min | min / source | JPEG encodes/s | refused |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        rows.append(f"| {p.server} | {p.viewers} | {p.cpu_percent:.1f} | {p.cpu_ms_per_frame:.1f} | "
                    f"{p.source_fps:.1f} | "
                    f"{p.fps_median:.1f} | {p.fps_min:.1f} | {100 * p.min_ratio:.0f} % | "
                    f"{p.encodes_per_s:.1f} | {p.refused} |")
    return "\n".join(rows)


def verdicts(points: list[Point]) -> list[str]:
    dash = {p.viewers: p for p in points if p.server == "dashboard"}
    lines = []
    if 1 in dash and 50 in dash:
        ratio = dash[50].cpu_percent / dash[1].cpu_percent
        per_frame = dash[50].cpu_ms_per_frame / dash[1].cpu_ms_per_frame
        lines.append(f"- CPU(50) / CPU(1) = {ratio:.2f} (target <= 1.5): "
                     f"{'PASS' if ratio <= 1.5 else 'FAIL'}; per source frame {per_frame:.2f}")
    worst = min((p.min_ratio for p in dash.values() if p.viewers), default=0.0)
    lines.append(f"- slowest viewer at any count = {100 * worst:.0f} % of the source fps (target >= 95 %): "
                 f"{'PASS' if worst >= 0.95 else 'FAIL'}")
    if 0 in dash:
        lines.append(f"- encodes with no viewer = {dash[0].encodes_per_s:.1f}/s (target 0): "
                     f"{'PASS' if dash[0].encodes_per_s == 0 else 'FAIL'}")
    base = {p.viewers: p for p in points if p.server == "baseline"}
    if 1 in base and max(base) in dash:
        n = max(base)
        lines.append(f"- baseline at {n} viewers: CPU {base[n].cpu_percent:.0f} % "
                     f"(x{base[n].cpu_percent / base[1].cpu_percent:.2f} its 1-viewer CPU), "
                     f"{base[n].encodes_per_s:.0f} encodes/s, slowest viewer "
                     f"{100 * base[n].min_ratio:.0f} % of the source fps")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", default="1,5,20,50")
    parser.add_argument("--window", type=float, default=8.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each window")
    parser.add_argument("--output", default=str(ROOT / "bench" / "README_fanout.md"))
    args = parser.parse_args()
    counts = [int(v) for v in args.viewers.split(",")]

    load_before = os.getloadavg()
    points: list[Point] = []
    for name in ("dashboard", "baseline"):
        with start_server(name) as server:
            plan = ([0] if name == "dashboard" else []) + counts
            for n in plan:
                point = measure(server, n, args.warmup, args.window)
                points.append(point)
                print(f"{name:9s} {n:3d} viewers: CPU {point.cpu_percent:5.1f} %  source "
                      f"{point.source_fps:4.1f} fps  viewers median {point.fps_median:4.1f} min "
                      f"{point.fps_min:4.1f}  encodes {point.encodes_per_s:5.1f}/s  refused {point.refused}",
                      flush=True)
    load_after = os.getloadavg()
    report = "\n".join(verdicts(points))
    print(report)
    cpu = f"{os.cpu_count()} x {platform.processor() or platform.machine()}"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        cpu = f"{os.cpu_count()} x {model}"
    except (OSError, StopIteration):
        pass
    Path(args.output).write_text(f"""## MJPEG fan-out (bench/fanout.py)

    python bench/fanout.py

Source `{SOURCE}`, overlay on, model `{MODEL}` (ONNX Runtime, 1 thread), viewers at `?res=720p`
on raw sockets from {min(4, max(counts))} client processes; {args.window:g} s measured per point after
{args.warmup:g} s of warm-up. Server CPU = user + system time of the server process (all its
threads) over the window; 100 % = one core; CPU ms / frame divides it by the source fps.
Machine: {cpu}, Python {platform.python_version()}; the client processes run on the same
machine; load average {load_before[0]:.1f} before and {load_after[0]:.1f} after the run (a busy
machine slows the source below 30 fps: each viewer is compared with the source in its window).

**dashboard**: `python -m app` — one encode per frame and resolution, shared by all viewers
(asyncio fan-out). **baseline**: `bench/baseline_server.py` — the tutorial pattern, a sync
generator per viewer calling `cv2.imencode` on each new frame (same capture/inference loop).

{table(points)}

{report}
""")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
