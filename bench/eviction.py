"""Time until a viewer or SSE slot frees when the caps are held by clients that never read:
the dashboard of this checkout beside an older one (``--before``), in the same run.

    git worktree add --detach /tmp/before-eviction 9442eee
    python bench/eviction.py --before /tmp/before-eviction [--rounds 1] [--give-up 90]

Each server runs in its own process (source synthetic 1280x720@30, EfficientNet-Lite0 on one
thread, the default --max-viewers 64). The attack: 64 MJPEG viewers and 64 SSE subscribers on
raw sockets with a 4 KB receive buffer that send their GET and never read. Once a new viewer and
a new subscriber are both refused (503), a prober asks every 0.5 s for /stream.mjpg and
/results/events and notes when each first answers 200 and delivers a part / a result event.
Also counted: the stuck sockets the server closed, and the loop's fps while the caps were held.
Every process started is stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, SYNTHETIC_720P, Server, dashboard, machine  # noqa: E402

CAP = 64
PATHS = ("/stream.mjpg", "/results/events")
FIRST = {"/stream.mjpg": b"--frame", "/results/events": b"event: result"}


@contextlib.contextmanager
def stuck_clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for path in PATHS:
            for _ in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(10)
                sock.connect(("127.0.0.1", port))
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        yield socks
    finally:
        for sock in socks:
            sock.close()


def probe(port: int, path: str, timeout: float = 5.0) -> int:
    """The status a new client gets; 200 only once the first part or event has come too."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                status = int(data.split(b" ", 2)[1])
                if status != 200 or FIRST[path] in data:
                    return status
        return 0


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(1 << 20):
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset: the server aborted it
        return True


def attack(server: Server, give_up: float) -> dict[str, float]:
    with stuck_clients(server.port, CAP) as socks:
        deadline = time.monotonic() + 30
        while True:
            stats = server.stats()
            if len(stats["viewers"]) >= CAP and stats["event_subscribers"] >= CAP:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stuck clients did not all connect: {stats}")
            time.sleep(0.2)
        if any(probe(server.port, p) != 503 for p in PATHS):
            raise RuntimeError("the caps are not full")
        full, pub0 = time.monotonic(), int(server.stats()["published"])
        freed: dict[str, float] = {}
        while len(freed) < len(PATHS) and time.monotonic() - full < give_up:
            for path in PATHS:
                if path not in freed and probe(server.port, path) == 200:
                    freed[path] = time.monotonic() - full
            time.sleep(0.5)
        elapsed = time.monotonic() - full
        fps = (int(server.stats()["published"]) - pub0) / elapsed
        closed = sum(closed_by_server(s) for s in socks)
    return {"viewer": freed.get(PATHS[0], -1.0), "sse": freed.get(PATHS[1], -1.0),
            "closed": float(closed), "fps": fps}


def fmt(seconds: float, give_up: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 0 else f"never (> {give_up:g} s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the older checkout")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--give-up", type=float, default=90.0, help="seconds to wait for a slot")
    args = parser.parse_args()
    print(f"eviction: {CAP} + {CAP} clients that never read, source {SYNTHETIC_720P}; {machine()}",
          flush=True)
    rows: list[tuple[str, int, dict[str, float]]] = []
    for round_ in range(1, args.rounds + 1):
        for name, product in (("after", ROOT), ("before", args.before.resolve())):
            with dashboard(SYNTHETIC_720P, "--fifo", "off", "--iot", "off", product=product) as server:
                result = attack(server, args.give_up)
            rows.append((name, round_, result))
            print(f"{name:6s} round {round_}: viewer slot {fmt(result['viewer'], args.give_up)}, "
                  f"SSE slot {fmt(result['sse'], args.give_up)}, stuck sockets closed "
                  f"{result['closed']:.0f}/{2 * CAP}, loop {result['fps']:.1f} fps", flush=True)
    print()
    print("| code | round | a viewer slot frees after | an SSE slot frees after | stuck sockets closed "
          "by the server | loop fps meanwhile |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, round_, r in rows:
        print(f"| {name} | {round_} | {fmt(r['viewer'], args.give_up)} | {fmt(r['sse'], args.give_up)} "
              f"| {r['closed']:.0f} / {2 * CAP} | {r['fps']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
