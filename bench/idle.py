"""Idle: with no viewer and no FIFO reader the dashboard must cost (almost) only its model.

    python bench/idle.py [--repeats 5] [--window 15] [--warmup 4]

Side by side, in turn, ``--repeats`` times, on the same paced source (synthetic 1280x720@30) and
model (EfficientNet-Lite0, ONNX Runtime, 1 thread):

- model-only: read the source, preprocess, infer, parse in a plain loop (bench.common);
- dashboard: ``python -m app`` with its defaults (overlay on, display 720p, the broadcaster, the
  control page's routes) plus a FIFO at a temporary path that nobody opens; ``--iot off``;
  nobody connects.

Each process's CPU (user + system, all threads) over the window; JPEG encodes over the window
from /api/stats. Targets: encodes = 0; dashboard CPU <= 1.05 x model-only CPU (median of the
per-round ratios).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SYNTHETIC_720P, dashboard, machine, median, run_model_only  # noqa: E402


def run_dashboard(tmp: str, warmup: float, window: float) -> dict[str, float]:
    with dashboard(SYNTHETIC_720P, "--fifo", os.path.join(tmp, "idle.mjpeg"), "--iot", "off") as server:
        time.sleep(warmup)
        s0, c0, w0 = server.stats(), server.cpu_seconds(), time.monotonic()
        time.sleep(window)
        s1, c1, w1 = server.stats(), server.cpu_seconds(), time.monotonic()
        elapsed = w1 - w0
        return {"cpu_percent": 100.0 * (c1 - c0) / elapsed,
                "fps": (s1["frames"] - s0["frames"]) / elapsed,
                "encodes": s1["jpeg"]["encodes_total"] - s0["jpeg"]["encodes_total"],
                "encodes_ever": s1["jpeg"]["encodes_total"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=4.0)
    args = parser.parse_args()
    print(f"idle: source {SYNTHETIC_720P}, {args.repeats} rounds of {args.window:g} s; {machine()}",
          flush=True)
    mo, dash = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            m = run_model_only(SYNTHETIC_720P, None, args.warmup, args.window)
            d = run_dashboard(tmp, args.warmup, args.window)
            mo.append(m)
            dash.append(d)
            print(f"round {r + 1}: model-only CPU {m['cpu_percent']:.1f} % at {m['fps']:.1f} fps | "
                  f"dashboard CPU {d['cpu_percent']:.1f} % at {d['fps']:.1f} fps, encodes "
                  f"{d['encodes']:.0f} (ever {d['encodes_ever']:.0f}) | ratio "
                  f"{d['cpu_percent'] / m['cpu_percent']:.3f}", flush=True)
    ratios = [d["cpu_percent"] / m["cpu_percent"] for m, d in zip(mo, dash, strict=True)]
    encodes = sum(d["encodes_ever"] for d in dash)
    print()
    print("| process | CPU % (median) | fps (median) | JPEG encodes |")
    print("|---|---:|---:|---:|")
    print(f"| model-only | {median([m['cpu_percent'] for m in mo]):.1f} | "
          f"{median([m['fps'] for m in mo]):.1f} | - |")
    print(f"| dashboard, no viewer, FIFO without reader | {median([d['cpu_percent'] for d in dash]):.1f} | "
          f"{median([d['fps'] for d in dash]):.1f} | {encodes:.0f} |")
    print()
    ratio = median(ratios)
    print(f"- encodes with no consumer: {encodes:.0f} (target 0): {'PASS' if encodes == 0 else 'FAIL'}")
    print(f"- CPU dashboard / model-only = {ratio:.3f} (median of rounds; min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}) (target <= 1.05): {'PASS' if ratio <= 1.05 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
