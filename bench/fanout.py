"""MJPEG fan-out: the dashboard's encode-once stream vs a per-viewer-encode baseline, same run.

    python bench/fanout.py [--viewers 1,5,20,50,100] [--repeats 2] [--baseline-viewers 1,5,20,50]
                           [--window 8] [--warmup 2]

For each viewer count, each server runs in its own process (source synthetic 1280x720@30,
overlay on, EfficientNet-Lite0 on one thread) and viewers read ``?res=720p`` from up to 4 client
processes over raw sockets (bench.common: HTTP chunks parsed, each part counted when complete).
Measured over the window: the server process's CPU (psutil cpu_times, all threads), each viewer's
fps (parts completed), bytes per second to all viewers, JPEG encodes per second and the source
fps; plus the dashboard's encodes with no viewer at all. The dashboard's counts are run
``--repeats`` times in turn and each figure is the median over the rounds. The baseline is
bench/baseline_server.py (a sync generator per viewer calling cv2.imencode, as tutorials do).

Targets: dashboard CPU at 50 viewers <= 1.5 x CPU at 1; every viewer >= 95 % of the source fps
up to 50 viewers; zero encodes with no consumer. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import child_env, collect_viewers, machine, start_viewers  # noqa: E402

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
    env = child_env()
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
    bytes_per_s: float = 0.0

    @property
    def cpu_ms_per_frame(self) -> float:
        """CPU per source frame: comparable across points when a busy machine slows the source."""
        return 10.0 * self.cpu_percent / self.source_fps if self.source_fps else 0.0

    @property
    def min_ratio(self) -> float:
        return self.fps_min / self.source_fps if self.source_fps else 0.0


def measure(server: Server, viewers: int, warmup: float, window: float) -> Point:
    t0 = time.time() + warmup + 1.0  # +1 s for the client processes to start
    t1 = t0 + window
    procs, out = start_viewers(server.port, server.stream_path, viewers, t0, t1)
    time.sleep(max(0.0, t0 - time.time()))
    cpu0, (enc0, pub0), w0 = server.cpu_seconds(), server.counters(), time.time()
    time.sleep(max(0.0, t1 - time.time()))
    cpu1, (enc1, pub1), w1 = server.cpu_seconds(), server.counters(), time.time()
    elapsed = w1 - w0
    results = collect_viewers(procs, out)
    ok = [r for r in results if r["status"] == 200]
    fps = [r["parts"] / window for r in ok]
    return Point(
        server.name, viewers, 100.0 * (cpu1 - cpu0) / elapsed, (pub1 - pub0) / elapsed,
        (enc1 - enc0) / elapsed, statistics.median(fps) if fps else 0.0,
        min(fps) if fps else 0.0, len(results) - len(ok), sum(r["bytes"] for r in ok) / window,
    )


# -- report ----------------------------------------------------------------------------------------
def table(points: list[Point]) -> str:
    rows = ["| server | viewers | server CPU % | CPU ms / frame | source fps | viewer fps median "
            "| viewer fps min | min / source | JPEG encodes/s | MB/s to viewers | refused |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        rows.append(f"| {p.server} | {p.viewers} | {p.cpu_percent:.1f} | {p.cpu_ms_per_frame:.1f} | "
                    f"{p.source_fps:.1f} | {p.fps_median:.1f} | {p.fps_min:.1f} | "
                    f"{100 * p.min_ratio:.0f} % | {p.encodes_per_s:.1f} | {p.bytes_per_s / 1e6:.1f} | "
                    f"{p.refused} |")
    return "\n".join(rows)


def combine(points: list[Point]) -> Point:
    """The median of each figure over the rounds; the slowest viewer's fps is the minimum."""
    med = statistics.median
    return Point(points[0].server, points[0].viewers, med(p.cpu_percent for p in points),
                 med(p.source_fps for p in points), med(p.encodes_per_s for p in points),
                 med(p.fps_median for p in points), min(p.fps_min for p in points),
                 sum(p.refused for p in points), med(p.bytes_per_s for p in points))


def verdicts(points: list[Point]) -> list[str]:
    dash = {p.viewers: p for p in points if p.server == "dashboard"}
    lines = []
    if 1 in dash and 50 in dash:
        ratio = dash[50].cpu_percent / dash[1].cpu_percent
        per_frame = dash[50].cpu_ms_per_frame / dash[1].cpu_ms_per_frame
        lines.append(f"- CPU(50) / CPU(1) = {ratio:.2f} (target <= 1.5): "
                     f"{'PASS' if ratio <= 1.5 else 'FAIL'}; per source frame {per_frame:.2f}")
    if 1 in dash and 100 in dash:
        lines.append(f"- CPU(100) / CPU(1) = {dash[100].cpu_percent / dash[1].cpu_percent:.2f} (no target)")
    upto50 = [p for p in dash.values() if 0 < p.viewers <= 50]
    worst = min((p.min_ratio for p in upto50), default=0.0)
    lines.append(f"- slowest viewer up to 50 viewers = {100 * worst:.0f} % of the source fps "
                 f"(target >= 95 %): {'PASS' if worst >= 0.95 else 'FAIL'}")
    if 100 in dash:
        lines.append(f"- at 100 viewers the slowest viewer gets {100 * dash[100].min_ratio:.0f} % of the "
                     f"source fps (no target)")
    if 0 in dash:
        lines.append(f"- encodes with no viewer = {dash[0].encodes_per_s:.1f}/s (target 0): "
                     f"{'PASS' if dash[0].encodes_per_s == 0 else 'FAIL'}")
    base = {p.viewers: p for p in points if p.server == "baseline"}
    if 1 in base and len(base) > 1:
        n = max(base)
        lines.append(f"- baseline at {n} viewers: CPU {base[n].cpu_percent:.0f} % "
                     f"(x{base[n].cpu_percent / base[1].cpu_percent:.2f} its 1-viewer CPU), "
                     f"{base[n].encodes_per_s:.0f} encodes/s, slowest viewer "
                     f"{100 * base[n].min_ratio:.0f} % of the source fps")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", default="1,5,20,50,100")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the dashboard's counts")
    parser.add_argument("--baseline-viewers", default="1,5,20,50", help="'' to skip the baseline")
    parser.add_argument("--window", type=float, default=8.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each window")
    args = parser.parse_args()
    counts = [int(v) for v in args.viewers.split(",")]
    base_counts = [int(v) for v in args.baseline_viewers.split(",") if v]
    print(f"fan-out: source {SOURCE}, viewers at ?res=720p, {args.window:g} s per point, "
          f"{args.repeats} rounds; {machine()}", flush=True)
    points: list[Point] = []
    for name, plan, rounds in (("dashboard", [0, *counts], args.repeats), ("baseline", base_counts, 1)):
        if not plan:
            continue
        measured: dict[int, list[Point]] = {n: [] for n in plan}
        with start_server(name) as server:
            for _ in range(rounds):
                for n in plan:
                    point = measure(server, n, args.warmup, args.window)
                    measured[n].append(point)
                    print(f"{name:9s} {n:3d} viewers: CPU {point.cpu_percent:5.1f} %  source "
                          f"{point.source_fps:4.1f} fps  viewers median {point.fps_median:4.1f} min "
                          f"{point.fps_min:4.1f}  encodes {point.encodes_per_s:5.1f}/s  "
                          f"{point.bytes_per_s / 1e6:5.1f} MB/s  refused {point.refused}", flush=True)
        points.extend(combine(measured[n]) for n in plan)
    print()
    print(table(points))
    print()
    print("\n".join(verdicts(points)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
