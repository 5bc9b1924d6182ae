"""Loop fps with every overlay on vs model-only fps, side by side on the same frames.

    python bench/loop_overhead.py [--frames 300] [--repeats 5] [--threads 1]

model-only: preprocess -> infer -> parse (cut to top-k, as the loop does) on pre-decoded frames in
            a plain for loop.
loop:       the InferenceLoop thread on the same pre-decoded frames (capture, preprocess, infer,
            parse, top-k/threshold, hub publish), with one consumer (this script's main thread,
            standing for a viewer's encoder) taking every frame's image, so the display resize
            and the overlay with its fps line are drawn for each frame, off the loop thread.
Runs alternate (model-only, loop, model-only, ...) so machine noise hits both; the ratio of the
medians is reported. Target: loop fps >= 0.95 x model-only fps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402

from inference.models import load_model  # noqa: E402
from inference.service import Service  # noqa: E402
from inference.settings import Settings  # noqa: E402
from inference.sources.video import demo_clip  # noqa: E402
from inference.types import Image, Model  # noqa: E402


def decode_frames(n: int) -> list[Image]:
    cap = cv2.VideoCapture(str(demo_clip()))
    frames: list[Image] = []
    while len(frames) < n:
        ok, frame = cap.read()
        if not ok:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        frames.append(frame)
    cap.release()
    return frames


class MemorySource:
    """Hands out pre-decoded frames unpaced, so both sides see the same pixels and no decode."""

    name = "memory"

    def __init__(self, frames: list[Image]) -> None:
        self.frames = frames
        self.i = 0

    def open(self) -> None:
        self.i = 0

    def read(self) -> Image | None:
        frame = self.frames[self.i % len(self.frames)]
        self.i += 1
        # The loop draws on what it gets; a copy stands for the fresh buffer a camera hands out.
        return frame.copy()

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


def model_only(model: Model, frames: list[Image], top_k: int) -> float:
    start = time.perf_counter()
    for frame in frames:
        # The parse cut to top-k, built as the loop builds it.
        model.parse_top(model.infer(model.preprocess(frame)), top_k)
    return len(frames) / (time.perf_counter() - start)


def loop_fps(model: Model, frames: list[Image], settings: Settings) -> float:
    service = Service(settings, source_factory=lambda s: MemorySource(frames),
                      model_factory=lambda s: model)
    service.prepare()
    service.start()
    hub = service.hub
    first = hub.wait_newer(0, 10)
    assert first is not None
    t0, seq0 = time.perf_counter(), first.seq
    target = seq0 + len(frames)
    seq = seq0
    while seq < target:
        item = hub.wait_newer(seq, 10)
        assert item is not None
        item.image  # noqa: B018 - the first consumer draws the frame (resize + overlay)
        seq = item.seq
    fps = (seq - seq0) / (time.perf_counter() - t0)
    service.stop()
    return fps


def bench(name: str, frames: list[Image], repeats: int, **kw: Any) -> dict[str, float]:
    settings = Settings(model=name, top_k=5, threshold=0.0 if name != "centerface" else 0.3,
                        display_res="720p", overlay=True, **kw)
    model = load_model(settings)
    model_only(model, frames[:20], settings.top_k)  # warm-up
    m, lp = [], []
    for _ in range(repeats):
        m.append(model_only(model, frames, settings.top_k))
        lp.append(loop_fps(model, frames, settings))
    return {"model_only": statistics.median(m), "loop": statistics.median(lp),
            "ratio": statistics.median(lp) / statistics.median(m),
            "ratio_min": min(b / a for a, b in zip(m, lp))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads, as the other benchmarks (0 = the "
                             "product's default, one per core)")
    args = parser.parse_args()
    frames = decode_frames(args.frames)
    print(f"frames: {len(frames)} of bikes.mp4 ({frames[0].shape[1]}x{frames[0].shape[0]}), "
          f"repeats: {args.repeats}, display 720p, overlays on, ONNX Runtime threads {args.threads}")
    print(f"{'model':<20}{'model-only fps':>16}{'loop fps':>12}{'ratio':>8}{'worst pair':>12}")
    for name in ("efficientnet-lite0", "centerface"):
        r = bench(name, frames, args.repeats, threads=args.threads)
        print(f"{name:<20}{r['model_only']:>16.1f}{r['loop']:>12.1f}{r['ratio']:>8.3f}"
              f"{r['ratio_min']:>12.3f}")


if __name__ == "__main__":
    main()
