"""/results under load: 200 requests/s for 30 s while 20 viewers stream.

    python bench/results_load.py [--rate 200] [--seconds 30] [--viewers 20] [--connections 8]

The dashboard (source synthetic 1280x720@30, EfficientNet-Lite0 on 1 thread, FIFO and IoT off)
in its own process. A load process sends ``GET /results`` open-loop: request i is due at
t0 + i / rate, on the first free of ``--connections`` keep-alive connections (raw HTTP/1.1 on
asyncio streams; a new connection if all are busy). Latency runs from the time a request was due
(not when a connection became free, so a stall is not hidden) to the last byte of its response.
Errors: any status but 200, a connection error, or no answer within 2 s. Run twice in the same
server: with no viewer, then with ``--viewers`` viewers on ``/stream.mjpg?res=720p`` from 2
client processes. Targets (with viewers): p99 < 20 ms, no errors.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SYNTHETIC_720P,
    collect_viewers,
    dashboard,
    machine,
    percentile,
    start_viewers,
)

TIMEOUT = 2.0


async def _load(port: int, rate: float, seconds: float, connections: int, t0: float) -> dict[str, Any]:
    free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    opened: list[asyncio.StreamWriter] = []
    for _ in range(connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        opened.append(writer)
        free.put_nowait((reader, writer))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    request = b"GET /results HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    async def one(due: float) -> None:
        conn = None
        try:
            if free.empty():
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                opened.append(writer)
                conn = (reader, writer)
            else:
                conn = free.get_nowait()
            reader, writer = conn
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
            latencies.append(1000.0 * (time.time() - due))
            if status != 200:
                errors[f"status {status}"] = errors.get(f"status {status}", 0) + 1
            free.put_nowait(conn)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            if conn is not None:
                conn[1].close()

    tasks = []
    total = int(rate * seconds)
    for i in range(total):
        due = t0 + i / rate
        delay = due - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    for writer in opened:
        writer.close()
    return {"sent": total, "latencies": latencies, "errors": errors, "connections": len(opened),
            "elapsed": time.time() - t0}


def load_process(port: int, rate: float, seconds: float, connections: int, t0: float, out: Any) -> None:
    out.put(asyncio.run(_load(port, rate, seconds, connections, t0)))


def phase(port: int, args: argparse.Namespace, viewers: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    t0 = time.time() + 3.0  # client processes up, viewers streaming
    t1 = t0 + args.seconds
    procs, out = start_viewers(port, "/stream.mjpg?res=720p", viewers, t0, t1, max_procs=2)
    q = ctx.Queue()
    loader = ctx.Process(target=load_process, args=(port, args.rate, args.seconds, args.connections, t0, q),
                         daemon=True)
    loader.start()
    try:
        result: dict[str, Any] = q.get(timeout=args.seconds + 60)
        streamed = collect_viewers(procs, out)
    finally:
        loader.join(10)
        if loader.is_alive():
            loader.terminate()
    result["viewer_fps_min"] = min((r["parts"] / args.seconds for r in streamed), default=0.0)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--viewers", type=int, default=20)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    print(f"/results load: {args.rate:g} req/s for {args.seconds:g} s; source {SYNTHETIC_720P}; "
          f"{machine()}", flush=True)
    rows = []
    with dashboard(SYNTHETIC_720P, "--fifo", "off", "--iot", "off", "--max-viewers", "200") as server:
        for viewers in (0, args.viewers):
            r = phase(server.port, args, viewers)
            lat = r["latencies"]
            errors = sum(r["errors"].values())
            row = {"viewers": viewers, "sent": r["sent"], "ok": len(lat), "errors": errors,
                   "kinds": r["errors"], "p50": percentile(lat, 50), "p99": percentile(lat, 99),
                   "max": max(lat, default=0.0), "rate": len(lat) / r["elapsed"],
                   "connections": r["connections"], "viewer_fps_min": r["viewer_fps_min"]}
            rows.append(row)
            print(f"{viewers:3d} viewers: {row['ok']}/{row['sent']} answered ({row['rate']:.0f}/s), "
                  f"errors {errors} {r['errors'] or ''}; p50 {row['p50']:.1f} ms, p99 {row['p99']:.1f} ms, "
                  f"max {row['max']:.1f} ms; connections {row['connections']}; slowest viewer "
                  f"{row['viewer_fps_min']:.1f} fps", flush=True)
    print()
    print("| viewers streaming | requests | answered/s | errors | p50 ms | p99 ms | max ms "
          "| slowest viewer fps |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['viewers']} | {row['sent']} | {row['rate']:.0f} | {row['errors']} | "
              f"{row['p50']:.1f} | {row['p99']:.1f} | {row['max']:.1f} | {row['viewer_fps_min']:.1f} |")
    print()
    last = rows[-1]
    print(f"- with {last['viewers']} viewers: p99 {last['p99']:.1f} ms (target < 20 ms): "
          f"{'PASS' if last['p99'] < 20 else 'FAIL'}; errors {last['errors']} (target 0): "
          f"{'PASS' if last['errors'] == 0 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
