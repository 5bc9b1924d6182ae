"""Latency: capture-to-viewer, from a part's X-Timestamp to the moment the client has all of it.

    python bench/latency.py [--viewers 1,20] [--window 15] [--warmup 3] [--repeats 3]
                            [--clients-nice N]

The dashboard (source synthetic 1280x720@30, EfficientNet-Lite0 on 1 thread, FIFO and IoT off)
in its own process; viewers read ``/stream.mjpg?res=720p`` on raw sockets from client processes
and note, for every part, the wall-clock time its last byte arrived (same machine, same clock as
the server's ``time.time()`` capture stamp). One /results/events subscriber in the same run gives
each frame's own pipeline time (preprocess + inference + postprocess, the result's
``timings_ms``), so each part's latency splits into:

- capture-to-viewer = arrival - X-Timestamp (what the issue names);
- publish-to-viewer = capture-to-viewer - that frame's pipeline time: what the hub, the resize
  and overlay (drawn at the first consumer's request), the encode and the fan-out add after the
  loop has published the frame.

After the dashboard, the same model runs alone on the same paced source for as long
(model-only: preprocess, infer, parse in a plain loop in its own process) and its per-frame p50 /
p99 are printed beside the dashboard's pipeline times: the floor under capture-to-viewer.
The JPEG encode time is measured in the same window (the hub's encode_seconds over its encodes,
from /api/stats). Targets: p50 <= encode + 5 ms; p99 < one frame interval (33.3 ms) at 20 viewers.
Repeats restart nothing: each repeat is a new window with fresh viewers; all parts are pooled.
``--clients-nice N`` runs the client processes (viewers, SSE) at nice N: a diagnosis, showing how
much of the tail is this machine's own clients competing with the loop for the same 2 CPUs (on a
device, browsers are elsewhere); the figures the README reports as the result use the default 0.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SYNTHETIC_720P,
    Server,
    collect_viewers,
    dashboard,
    machine,
    percentile,
    run_model_only,
    sse_process,
    start_viewers,
)

PIPELINE = ("preprocess", "inference", "postprocess")
INTERVAL_MS = 1000.0 / 30


def encode_totals(server: Server) -> tuple[int, float]:
    jpeg = server.stats()["jpeg"]
    total = int(jpeg["encodes_total"])
    return total, float(jpeg["encode_ms_avg"]) * total


def renice(pids: list[int | None], nice: int) -> None:
    for pid in pids:
        if pid and nice:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, pid, nice)


def window(server: Server, viewers: int, warmup: float, seconds: float,
           clients_nice: int = 0) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    t0 = time.time() + warmup + 1.0
    t1 = t0 + seconds
    procs, out = start_viewers(server.port, "/stream.mjpg?res=720p", viewers, t0, t1, latency=True,
                               max_procs=2)
    side = ctx.Queue()
    sse = ctx.Process(target=sse_process, args=(server.port, t0, t1, side), daemon=True)
    sse.start()
    renice([p.pid for p in procs] + [sse.pid], clients_nice)
    try:
        time.sleep(max(0.0, t0 - time.time()))
        n0, ms0 = encode_totals(server)
        time.sleep(max(0.0, t1 - time.time()))
        n1, ms1 = encode_totals(server)
        results = collect_viewers(procs, out)
        events = side.get(timeout=30)["by_seq"]
    finally:
        sse.join(10)
        if sse.is_alive():
            sse.terminate()
    capture, publish = [], []
    # Per frame, not per part: what the model itself took while these viewers watched.
    pipelines = [sum(event["timings_ms"].get(k, 0.0) for k in PIPELINE) for event in events.values()]
    for r in results:
        for (seq, _), lat in zip(r["arrivals"], r["latency"], strict=True):
            capture.append(1000.0 * lat)
            event = events.get(seq)
            if event is not None:
                pipeline = sum(event["timings_ms"].get(k, 0.0) for k in PIPELINE)
                publish.append(1000.0 * lat - pipeline)
    return {"capture": capture, "publish": publish, "pipelines": pipelines, "encodes": n1 - n0,
            "encode_ms": ms1 - ms0, "fps_min": min((r["parts"] / seconds for r in results), default=0.0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", default="1,20")
    parser.add_argument("--window", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients-nice", type=int, default=0, metavar="N",
                        help="run the viewer and SSE client processes at nice N (0..19; a "
                             "diagnosis: the reported figures use 0)")
    args = parser.parse_args()
    if not 0 <= args.clients_nice <= 19:
        parser.error(f"--clients-nice: expected 0..19, got {args.clients_nice}")
    counts = [int(v) for v in args.viewers.split(",")]
    print(f"latency: source {SYNTHETIC_720P}, viewers at ?res=720p, {args.repeats} x {args.window:g} s "
          f"per count{f', clients at nice {args.clients_nice}' if args.clients_nice else ''}; "
          f"{machine()}", flush=True)
    rows = []
    with dashboard(SYNTHETIC_720P, "--fifo", "off", "--iot", "off", "--max-viewers", "200") as server:
        for n in counts:
            pooled: dict[str, Any] = {"capture": [], "publish": [], "pipelines": [], "encodes": 0,
                                      "encode_ms": 0.0, "fps_min": []}
            for _ in range(args.repeats):
                w = window(server, n, args.warmup, args.window, args.clients_nice)
                for key in ("capture", "publish", "pipelines"):
                    pooled[key].extend(w[key])
                pooled["encodes"] += w["encodes"]
                pooled["encode_ms"] += w["encode_ms"]
                pooled["fps_min"].append(w["fps_min"])
            encode = pooled["encode_ms"] / pooled["encodes"] if pooled["encodes"] else 0.0
            row = {
                "viewers": n, "parts": len(pooled["capture"]), "encode": encode,
                "cap50": percentile(pooled["capture"], 50), "cap99": percentile(pooled["capture"], 99),
                "pub50": percentile(pooled["publish"], 50), "pub99": percentile(pooled["publish"], 99),
                "pipeline": percentile(pooled["capture"], 50) - percentile(pooled["publish"], 50),
                "model50": percentile(pooled["pipelines"], 50),
                "model99": percentile(pooled["pipelines"], 99),
                "fps_min": min(pooled["fps_min"]),
            }
            rows.append(row)
            print(f"{n:3d} viewers: {row['parts']} parts, encode {encode:.2f} ms; capture-to-viewer p50 "
                  f"{row['cap50']:.1f} p99 {row['cap99']:.1f} ms; publish-to-viewer p50 {row['pub50']:.1f} "
                  f"p99 {row['pub99']:.1f} ms; slowest viewer {row['fps_min']:.1f} fps", flush=True)
    # The same model on the same paced frames with no dashboard: how long its own tail is here.
    alone = run_model_only(SYNTHETIC_720P, None, args.warmup, args.window * args.repeats)
    print(f"model-only (no dashboard, same source, {args.window * args.repeats:g} s, right after): "
          f"pipeline p50 {alone['pipeline_p50_ms']:.1f} p99 {alone['pipeline_p99_ms']:.1f} ms, "
          f"{alone['fps']:.1f} fps", flush=True)
    print()
    print("| viewers | parts | JPEG encode ms (mean) | capture-to-viewer p50 | p99 | publish-to-viewer p50 "
          "| p99 | slowest viewer fps |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['viewers']} | {r['parts']} | {r['encode']:.2f} | {r['cap50']:.1f} | {r['cap99']:.1f} | "
              f"{r['pub50']:.1f} | {r['pub99']:.1f} | {r['fps_min']:.1f} |")
    print()
    for r in rows:
        limit = r["encode"] + 5.0
        print(f"- {r['viewers']} viewers: publish-to-viewer p50 {r['pub50']:.1f} ms vs encode + 5 = "
              f"{limit:.1f} ms: {'PASS' if r['pub50'] <= limit else 'FAIL'}; capture-to-viewer p50 "
              f"{r['cap50']:.1f} ms (the frame's own pipeline, median {r['pipeline']:.1f} ms, included)")
    big = max(rows, key=lambda r: r["viewers"])
    print(f"- {big['viewers']} viewers: capture-to-viewer p99 {big['cap99']:.1f} ms vs one frame "
          f"interval {INTERVAL_MS:.1f} ms: {'PASS' if big['cap99'] < INTERVAL_MS else 'FAIL'}; "
          f"publish-to-viewer p99 {big['pub99']:.1f} ms: {'PASS' if big['pub99'] < INTERVAL_MS else 'FAIL'}")
    for r in rows:
        # What bounds capture-to-viewer from below: the model's own time per frame in that window.
        print(f"- {r['viewers']} viewers: the frame's own pipeline (preprocess + inference + "
              f"postprocess) p50 {r['model50']:.1f} p99 {r['model99']:.1f} ms; model-only p50 "
              f"{alone['pipeline_p50_ms']:.1f} p99 {alone['pipeline_p99_ms']:.1f} ms")
    bound = alone["pipeline_p99_ms"]
    if bound >= INTERVAL_MS:
        print(f"- bound: the model alone has a p99 of {bound:.1f} ms here, at or past one frame "
              f"interval before anything is encoded or sent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
