"""Recording: what keeping events costs the loop, the CPU and the memory.

    python bench/recording.py [--repeats 3] [--window 20] [--warmup 6]

Side by side, in turn, ``--repeats`` times, the same dashboard (``python -m app``, the catdog
model on ONNX Runtime, 1 thread, ``--iot off``, ``--fifo off``, nobody watching) on the same
source, unpaced so the model sets the pace: a clip of 300 frames of coffee then 300 of a cat,
looped (skimage's pictures; about 3 s each at the ~100 fps the model runs here), so with
``--record cat:0.5`` an event starts every ~6 s and ends 1 s after the cat goes (``--post-roll 1``):

- off: no ``--record``;
- on: ``--record cat:0.5 --pre-roll 5 --post-roll 1 --record-cooldown 0`` into a temporary
  ``--data-dir``; clips by ffmpeg (H.264) when there is one.

Per round: the loop's fps (frames published / s, from /api/stats), the CPU of the dashboard and
its children (ffmpeg) over the window, RSS, the events recorded, and the pre-roll buffer's frames
and bytes. Target: loop fps on / off >= 0.95 (median of the per-round ratios); the storage per
minute of clip comes from the clips written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import cv2
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import dashboard, machine, median  # noqa: E402

SIZE = (1280, 720)
FPS = 25
SEGMENT_FRAMES = 300


def make_clip(path: Path, frames_each: int = SEGMENT_FRAMES) -> None:
    from skimage import data

    coffee = cv2.resize(cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR), SIZE)
    cat = cv2.resize(cv2.cvtColor(data.chelsea(), cv2.COLOR_RGB2BGR), SIZE)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), FPS, SIZE)
    for image in (coffee, cat):
        for i in range(frames_each):
            frame = image.copy()
            cv2.putText(frame, str(i), (40, 80), cv2.FONT_HERSHEY_SIMPLEX, 2, (255, 255, 255), 3)
            writer.write(frame)
    writer.release()


def tree_cpu(pid: int) -> float:
    """CPU seconds of the process, its live children and the children it already reaped."""
    proc = psutil.Process(pid)
    total = sum(proc.cpu_times()[:4])  # user, system, children_user, children_system
    for child in proc.children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return float(total)


def run(clip: Path, data_dir: Path, record: bool, warmup: float, window: float) -> Dict[str, Any]:
    extra = ["--model", "catdog", "--source-fps", "0", "--iot", "off", "--fifo", "off"]
    if record:
        extra += ["--record", "cat:0.5", "--pre-roll", "5", "--post-roll", "1",
                  "--record-cooldown", "0", "--data-dir", str(data_dir)]
    with dashboard(str(clip), *extra) as server:
        time.sleep(warmup)
        s0, c0, w0 = server.stats(), tree_cpu(server.pid), time.monotonic()
        time.sleep(window)
        s1, c1, w1 = server.stats(), tree_cpu(server.pid), time.monotonic()
        rss = psutil.Process(server.pid).memory_info().rss / 2**20
        events = server.stats().get("outputs", {}).get("events", {}) if record else {}
        elapsed = w1 - w0
        return {"fps": (s1["frames"] - s0["frames"]) / elapsed,
                "cpu_percent": 100.0 * (c1 - c0) / elapsed, "rss_mb": rss,
                "events": events.get("started", 0),
                "pre_roll_frames": events.get("pre_roll_frames", 0),
                "pre_roll_mb": events.get("pre_roll_bytes", 0) / 2**20}


def clip_figures(data_dir: Path) -> Dict[str, float]:
    seconds = size = 0.0
    for clip in sorted((data_dir / "clips").glob("*.mp4")):
        if clip.name.endswith(".part.mp4"):
            continue
        out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of",
                              "json", str(clip)], capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            seconds += float(json.loads(out.stdout)["format"]["duration"])
            size += clip.stat().st_size
    return {"clips_seconds": seconds, "mb_per_minute": size / 2**20 / (seconds / 60) if seconds else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=6.0)
    args = parser.parse_args()
    print(f"recording: {SIZE[0]}x{SIZE[1]} coffee/cat clip, unpaced, catdog, {args.repeats} rounds "
          f"of {args.window:g} s; {machine()}", flush=True)
    ratios: List[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "coffee-cat.mp4"
        make_clip(clip)
        data_dir = Path(tmp) / "data"
        for r in range(args.repeats):
            off = run(clip, data_dir, False, args.warmup, args.window)
            on = run(clip, data_dir, True, args.warmup, args.window)
            ratios.append(on["fps"] / off["fps"])
            print(f"round {r + 1}: off {off['fps']:.1f} fps, CPU {off['cpu_percent']:.0f} %, "
                  f"RSS {off['rss_mb']:.0f} MB | on {on['fps']:.1f} fps, CPU {on['cpu_percent']:.0f} % "
                  f"(with ffmpeg), RSS {on['rss_mb']:.0f} MB, {on['events']} events, pre-roll "
                  f"{on['pre_roll_frames']} frames {on['pre_roll_mb']:.1f} MB | fps ratio "
                  f"{ratios[-1]:.3f}", flush=True)
        figures = clip_figures(data_dir)
    print(f"loop fps on/off: median {median(ratios):.3f} (target >= 0.95); clips: "
          f"{figures['clips_seconds']:.0f} s, {figures['mb_per_minute']:.1f} MB per minute of clip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
