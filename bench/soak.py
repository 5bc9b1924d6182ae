"""Soak: viewer churn and long streaming must leave no memory, thread or fd behind.

    python bench/soak.py [--quick] [--cycles 2000] [--minutes 10] [--viewers 20]

The dashboard (source synthetic 1280x720@30, EfficientNet-Lite0, 1 thread, FIFO and IoT off)
runs in its own process. Baseline: after a 30 s warm-up at the streaming load (the allocator's
high-water mark for 20 viewers' buffers is reached once; what the soak looks for is growth after
that), with no client connected: RSS, threads, fds, loop fps. The cold RSS (never watched) is
printed too. Then:
1. churn: ``--cycles`` connect/disconnect cycles from 4 client processes, 8 at a time, in four
   kinds taken in turn: clean (read 3 parts, close), abrupt (read some bytes, RST via SO_LINGER 0),
   slow (read 4 KB every 50 ms for ~1 s, then close) and early (close right after the request);
   every 8th cycle opens /results/events instead of the stream;
2. streaming: ``--viewers`` viewers (a quarter of them slow readers) for ``--minutes``;
3. all closed, 5 s to settle: RSS, threads, fds and loop fps again.
Targets: RSS growth < 10 MB; threads and fds back to baseline; loop fps unchanged (>= 0.95 x).
``--quick``: 200 cycles and 0.5 minute of streaming.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SYNTHETIC_720P,
    ChunkedParts,
    Server,
    dashboard,
    machine,
    process_snapshot,
)

STREAM = "/stream.mjpg?res=720p"
WARMUP = 30.0  # seconds of the streaming load before the baseline


def one_cycle(port: int, kind: str, path: str) -> str:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        if kind == "early":
            return "ok"
        parser = ChunkedParts()
        parts = 0
        deadline = time.monotonic() + 10
        if kind == "slow":
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                data = sock.recv(4096)
                if not data:
                    return "eof"
                parser.feed(data)
                time.sleep(0.05)
        else:
            want = 3 if kind == "clean" else 1
            while parts < want and time.monotonic() < deadline:
                data = sock.recv(65536)
                if not data:
                    return "eof"
                parts += len(parser.feed(data))
        if parser.status not in (200, 0):
            return f"status {parser.status}"
        if kind == "abrupt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return "ok"
    finally:
        sock.close()


def churn_process(port: int, indices: list[int], concurrency: int, out: Any) -> None:
    import concurrent.futures as cf

    kinds = ("clean", "abrupt", "slow", "early")
    outcomes: dict[str, int] = {}

    def run(j: int) -> str:  # j: this process's own count, so each process mixes all kinds
        path = "/results/events" if j % 8 == 7 else STREAM
        try:
            return one_cycle(port, kinds[j % 4], path)
        except OSError as exc:
            return type(exc).__name__

    with cf.ThreadPoolExecutor(concurrency) as pool:
        for outcome in pool.map(run, range(len(indices))):
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    out.put(outcomes)


def stream_process(port: int, count: int, slow: int, seconds: float, out: Any) -> None:
    """``count`` viewers for ``seconds``; the first ``slow`` read 8 KB every 20 ms (~400 KB/s)."""
    import selectors

    sel = selectors.DefaultSelector()
    socks, parsers = [], []
    parts = [0] * count
    last_read = [0.0] * count
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(f"GET {STREAM} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, i)
        socks.append(sock)
        parsers.append(ChunkedParts())
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for key, _ in sel.select(timeout=0.02):
                i = key.data
                now = time.monotonic()
                if i < slow and now - last_read[i] < 0.02:
                    continue
                last_read[i] = now
                try:
                    data = key.fileobj.recv(8192 if i < slow else 1 << 20)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                parts[i] += len(parsers[i].feed(data))
        out.put({"fast_parts": parts[slow:], "slow_parts": parts[:slow]})
    finally:
        for sock in socks:
            sock.close()


def stream_phase(ctx: Any, out: Any, port: int, viewers: int, seconds: float,
                 server: Server | None = None) -> tuple[list[dict[str, Any]], list[float]]:
    """``viewers`` (a quarter slow) from 2 processes for ``seconds``; samples RSS if ``server``."""
    slow = viewers // 4
    share = [viewers // 2, viewers - viewers // 2]
    slow_share = [slow // 2, slow - slow // 2]
    procs = []
    for k in range(2):
        p = ctx.Process(target=stream_process, daemon=True,
                        args=(port, share[k], slow_share[k], seconds, out))
        p.start()
        procs.append(p)
    samples: list[float] = []
    t = time.monotonic()
    try:
        while server is not None and time.monotonic() - t < seconds:
            time.sleep(min(60.0, max(1.0, seconds / 10), max(0.0, seconds - (time.monotonic() - t))))
            snap = process_snapshot(server.pid)
            stats = server.stats()
            samples.append(snap["rss_mb"])
            print(f"  streaming {time.monotonic() - t:5.0f} s: RSS {snap['rss_mb']:.1f} MB, "
                  f"threads {snap['threads']:.0f}, fds {snap['fds']:.0f}, inference "
                  f"{stats['inference_fps']:.1f} fps, viewers {len(stats['viewers'])}", flush=True)
        streamed: list[dict[str, Any]] = [out.get(timeout=seconds + 120) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
    return streamed, samples


def loop_fps(server: Server, seconds: float = 5.0) -> float:
    a = int(server.stats()["frames"])
    t = time.monotonic()
    time.sleep(seconds)
    return (int(server.stats()["frames"]) - a) / (time.monotonic() - t)


def measure(server: Server) -> dict[str, float]:
    snap = process_snapshot(server.pid)
    snap["fps"] = loop_fps(server)
    snap.update(process_snapshot(server.pid) | {"rss_mb": snap["rss_mb"]})
    return snap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 cycles, 0.5 min streaming")
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--viewers", type=int, default=20)
    args = parser.parse_args()
    if args.quick:
        args.cycles, args.minutes = 200, 0.5
    ctx = mp.get_context("spawn")
    print(f"soak: {args.cycles} cycles, {args.minutes:g} min streaming with {args.viewers} viewers; "
          f"{machine()}", flush=True)
    with dashboard(SYNTHETIC_720P, "--fifo", "off", "--iot", "off", "--max-viewers", "200") as server:
        out = ctx.Queue()
        cold = process_snapshot(server.pid)
        print(f"cold (publishing, never watched): RSS {cold['rss_mb']:.1f} MB, threads "
              f"{cold['threads']:.0f}, fds {cold['fds']:.0f}", flush=True)
        stream_phase(ctx, out, server.port, args.viewers, WARMUP)
        time.sleep(3)
        base = measure(server)
        print(f"baseline: RSS {base['rss_mb']:.1f} MB, threads {base['threads']:.0f}, "
              f"fds {base['fds']:.0f}, loop {base['fps']:.1f} fps", flush=True)

        t = time.monotonic()
        nprocs = 4
        procs = []
        for k in range(nprocs):
            p = ctx.Process(target=churn_process, daemon=True,
                            args=(server.port, list(range(k, args.cycles, nprocs)), 2, out))
            p.start()
            procs.append(p)
        outcomes: dict[str, int] = {}
        try:
            for _ in procs:
                for key, value in out.get(timeout=3600).items():
                    outcomes[key] = outcomes.get(key, 0) + value
        finally:
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.terminate()
        churn_s = time.monotonic() - t
        time.sleep(5)
        after_churn = measure(server)
        stats = server.stats()
        print(f"churn: {args.cycles} cycles in {churn_s:.0f} s, outcomes {outcomes}; after: "
              f"RSS {after_churn['rss_mb']:.1f} MB, threads {after_churn['threads']:.0f}, "
              f"fds {after_churn['fds']:.0f}, loop {after_churn['fps']:.1f} fps, viewers left "
              f"{len(stats['viewers'])}, subscribers left {stats['event_subscribers']}", flush=True)

        seconds = args.minutes * 60
        streamed, samples = stream_phase(ctx, out, server.port, args.viewers, seconds, server)
        fast_parts = [n for r in streamed for n in r["fast_parts"]]
        slow_parts = [n for r in streamed for n in r["slow_parts"]]
        time.sleep(5)
        end = measure(server)
        stats = server.stats()
        print(f"streaming: {seconds:.0f} s; fast viewers min {min(fast_parts) / seconds:.1f} fps, "
              f"slow viewers min {min(slow_parts, default=0) / seconds:.1f} fps; RSS during "
              f"{min(samples):.1f}..{max(samples):.1f} MB", flush=True)
        print(f"end: RSS {end['rss_mb']:.1f} MB, threads {end['threads']:.0f}, fds {end['fds']:.0f}, "
              f"loop {end['fps']:.1f} fps, viewers left {len(stats['viewers'])}", flush=True)
        growth = end["rss_mb"] - base["rss_mb"]
        fps_ratio = end["fps"] / base["fps"] if base["fps"] else 0.0
        checks = [
            (f"RSS growth {growth:+.1f} MB (target < 10 MB)", growth < 10),
            (f"threads {base['threads']:.0f} -> {end['threads']:.0f} (target: back to baseline)",
             end["threads"] <= base["threads"]),
            (f"fds {base['fds']:.0f} -> {end['fds']:.0f} (target: back to baseline)",
             end["fds"] <= base["fds"]),
            (f"loop fps {base['fps']:.1f} -> {end['fps']:.1f} = x{fps_ratio:.3f} (target >= 0.95)",
             fps_ratio >= 0.95),
            (f"viewers left registered: {len(stats['viewers'])} (target 0)", not stats["viewers"]),
        ]
        for text, ok in checks:
            print(f"- {text}: {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
