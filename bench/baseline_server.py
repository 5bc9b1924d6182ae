"""The fan-out baseline for bench/fanout.py: MJPEG the way the common tutorials write it.

    python bench/baseline_server.py --port 8091 [--source synthetic:1280x720@30] [--model ...]

Flask/FastAPI "video streaming" tutorials give every viewer its own sync generator that encodes
each frame with ``cv2.imencode`` and yields it through ``StreamingResponse``. To compare only the
fan-out, this one shares our capture + inference + overlay loop (the same frames and model as the
dashboard); each viewer then waits for a new frame and encodes it itself, in a threadpool worker.
``/stats`` reports its encodes and published frames for the benchmark.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402

from inference.service import Service  # noqa: E402
from inference.settings import Settings  # noqa: E402


def build(settings: Settings) -> tuple[FastAPI, Service]:
    loop = Service(settings)
    app = FastAPI()
    lock = threading.Lock()
    counters = {"encodes": 0}

    def gen() -> Iterator[bytes]:
        seq = 0
        while True:
            item = loop.hub.wait_newer(seq, timeout=5.0)
            if item is None:
                continue
            seq = item.seq
            ok, buf = cv2.imencode(".jpg", item.image, [cv2.IMWRITE_JPEG_QUALITY, settings.jpeg_quality])
            with lock:
                counters["encodes"] += 1
            yield (b"--frame\r\nContent-Type: image/jpeg\r\nX-Frame-Seq: %d\r\n\r\n" % seq
                   + buf.tobytes() + b"\r\n")

    @app.get("/video_feed")
    def video_feed() -> StreamingResponse:
        return StreamingResponse(gen(), media_type="multipart/x-mixed-replace; boundary=frame")

    @app.get("/stats")
    def stats() -> dict[str, int]:
        return {"encodes": counters["encodes"], "published": loop.hub.published}

    return app, loop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--source", default="synthetic:1280x720@30")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    settings = Settings(source=args.source, model=args.model, threads=args.threads, overlay=True,
                        display_res="720p")
    app, service = build(settings)
    service.prepare()
    service.start()
    try:
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
