"""Edge: one huge request head, and 1000 idle sockets, against the code before and after the
connection limits (issue 16, points 2 and 3), side by side in one run.

    python bench/edge.py [--before DIR] [--rounds 1] [--header-mb 64] [--idle 1000]

BEFORE is ``--before DIR`` (another checkout), else a temporary git worktree of 9442eee (the
commit before app/edge.py), removed at the end; AFTER is this checkout. Each dashboard is
``python -m app`` on 127.0.0.1 with the benchmarks' model (EfficientNet-Lite0, ONNX Runtime,
1 thread) on ``synthetic:1280x720@30``, the FIFO off, IoT off, under a device-like open-files
limit of 1024 (RLIMIT_NOFILE set in the child). Per dashboard, in turn:

1. The loop's fps over 5 s, nobody connected (the baseline).
2. One raw socket sends ``GET /health`` with an ``X-Big`` header of ``--header-mb`` MB, in
   64 KiB pieces, from a thread of this process; this process reads the answer. Reported: the
   status, the time from the first byte sent to the first byte of the answer, how much had been
   sent by then, and the loop's fps from the first byte until the answer and the whole send
   are done (at least 3 s), divided by the baseline.
3. ``--idle`` sockets opened at once and never written to; one ``GET /health`` on a new
   connection 1 s later; then every socket watched for 30 s. Reported: how many the server
   closed within 1 s and in all, when the last one was closed, the /health status, and the
   process's open descriptors at their peak.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ROOT,
    SYNTHETIC_720P,
    Server,
    dashboard,
    machine,
    median,
)

BEFORE_COMMIT = "9442eee"
FILES = 1024  # a device's (and systemd's) default soft limit
PIECE = 64 * 1024


@contextlib.contextmanager
def before_tree(given: str | None) -> Iterator[Path]:
    if given:
        yield Path(given).resolve()
        return
    tmp = Path(tempfile.mkdtemp(prefix="edge-before-"))
    tree = tmp / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), BEFORE_COMMIT],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with contextlib.suppress(OSError):
            tmp.rmdir()


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILES, FILES))


def limited_dashboard(product: Path) -> Any:
    """The dashboard of ``product`` under a device-like open-files limit, its log silenced."""
    return dashboard(SYNTHETIC_720P, "--fifo", "off", "--iot", "off", product=product,
                     preexec_fn=_limit_files, stderr=subprocess.DEVNULL)


def frames(server: Server) -> int:
    return int(server.stats()["frames"])


def baseline_fps(server: Server, window: float = 5.0) -> float:
    f0, t0 = frames(server), time.monotonic()
    time.sleep(window)
    return (frames(server) - f0) / (time.monotonic() - t0)


def huge_header(server: Server, megabytes: int, base_fps: float) -> dict[str, Any]:
    size = megabytes << 20
    sent = [0]
    done = threading.Event()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)

    def send() -> None:
        piece = b"a" * PIECE
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            while sent[0] < size:
                sock.sendall(piece)
                sent[0] += PIECE
            sock.sendall(b"\r\n\r\n")
        done.set()

    f0 = frames(server)
    t0 = time.monotonic()
    sender = threading.Thread(target=send, name="bench-sender", daemon=True)
    sender.start()
    answer, first, sent_then = b"", None, 0
    deadline = t0 + 300
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        if first is None:
            first, sent_then = time.monotonic() - t0, sent[0]
        if not data:
            break
        answer += data
        if b"\r\n\r\n" in answer and done.is_set():
            break
    done.wait(max(0.0, deadline - time.monotonic()))
    elapsed = max(time.monotonic() - t0, 3.0)
    time.sleep(max(0.0, t0 + elapsed - time.monotonic()))
    fps = (frames(server) - f0) / (time.monotonic() - t0)
    sock.close()
    sender.join(5)
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "none"
    return {"status": status, "answer_s": first, "sent_mb_then": sent_then / 2**20,
            "window_s": time.monotonic() - t0, "fps": fps, "ratio": fps / base_fps}


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_of(obj: Any) -> socket.socket:
    assert isinstance(obj, socket.socket)
    return obj


def idle_sockets(server: Server, count: int, watch: float = 30.0) -> dict[str, Any]:
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    closed_at: list[float] = []
    health = "none"
    peak = open_descriptors(server.pid)
    try:
        t0 = time.monotonic()
        for _ in range(count):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", server.port))
            socks.append(s)
            sel.register(s, selectors.EVENT_READ)
        asked = False
        deadline = t0 + watch
        while time.monotonic() < deadline and len(closed_at) < count:
            if not asked and time.monotonic() - t0 >= 1.0:
                asked = True
                try:
                    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as h:
                        h.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        got = h.recv(64)
                        health = got.split(b" ", 2)[1].decode() if got.startswith(b"HTTP/1.1 ") else "closed"
                except OSError as exc:
                    health = type(exc).__name__
            for key, _ in sel.select(0.2):
                s = socket_of(key.fileobj)
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(s)
                    closed_at.append(time.monotonic() - t0)
            with contextlib.suppress(OSError):
                peak = max(peak, open_descriptors(server.pid))
    finally:
        for s in socks:
            s.close()
        sel.close()
    return {"closed_1s": sum(1 for t in closed_at if t <= 1.0), "closed": len(closed_at),
            "last_s": max(closed_at) if len(closed_at) == count else None, "health": health,
            "peak_fds": peak, "watch_s": watch}


def run(product: Path, args: argparse.Namespace) -> dict[str, Any]:
    with limited_dashboard(product) as server:
        time.sleep(3.0)
        base = baseline_fps(server)
        header = huge_header(server, args.header_mb, base)
        time.sleep(2.0)
        idle = idle_sockets(server, args.idle)
        return {"base_fps": base, **{f"h_{k}": v for k, v in header.items()},
                **{f"i_{k}": v for k, v in idle.items()}}


def row(name: str, r: dict[str, Any], args: argparse.Namespace) -> str:
    answer = "never" if r["h_answer_s"] is None else f"{r['h_answer_s']:.3f} s"
    last = (f"all by {r['i_last_s']:.1f} s" if r["i_last_s"] is not None
            else f"{args.idle - r['i_closed']} still open after {r['i_watch_s']:.0f} s")
    return (f"| {name} | {r['base_fps']:.1f} | {r['h_status']} after {answer} "
            f"({r['h_sent_mb_then']:.1f} MB sent by then) | {r['h_ratio']:.2f} "
            f"(over {r['h_window_s']:.1f} s) | {r['i_closed_1s']} at once, {last} | "
            f"{r['i_health']} | {r['i_peak_fds']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help=f"the BEFORE checkout (default: a worktree of {BEFORE_COMMIT})")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--header-mb", type=int, default=64)
    parser.add_argument("--idle", type=int, default=1000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.idle + 100:  # this process holds the idle sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.idle + 200), hard))
    print(f"edge: {args.header_mb} MB header, {args.idle} idle sockets, open-files limit {FILES}, "
          f"{args.rounds} round(s); {machine()}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with before_tree(args.before) as before:
        for round_ in range(args.rounds):
            for name, product in (("before", before), ("after", ROOT)):
                results[name].append(run(product, args))
                print(f"round {round_ + 1} {name}: {results[name][-1]}", flush=True)
    print()
    print("| code | loop fps alone | the huge header: answer | loop fps ratio while it is sent | "
          "idle sockets closed by the server | /health with them open | peak fds |")
    print("|---|---:|---|---:|---|---|---:|")
    for name in ("before", "after"):
        for r in results[name]:
            print(row(f"{name} ({BEFORE_COMMIT if name == 'before' else 'this checkout'})", r, args))
    if args.rounds > 1:
        for name in ("before", "after"):
            print(f"- {name}: median fps ratio {median([r['h_ratio'] for r in results[name]]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
