"""The seed's own design, for bench/overhead.py: the DeepLens inference Lambda as AWS wrote it.

    python bench/seed_baseline.py --fifo PATH --mqtt mqtt://127.0.0.1:PORT [--source ...]
        [--source-fps 0] [--warmup 4] [--window 10] [--counter FILE]

Reproduces /work/shared/reference/seed-deeplens-inference-lambda.md on the same frames and model
as the dashboard: in the loop thread, read -> preprocess -> infer -> parse -> top-k -> putText
-> ``LocalDisplay.set_frame_data`` (resize to 480p and ``cv2.imencode``, every frame) ->
``client.publish`` inline and synchronous (paho to a real broker: publish, then wait until it is
sent, as the Greengrass SDK's IPC call returns once delivered to the core). ``LocalDisplay`` is
the seed's thread: it opens the FIFO (blocking until a reader comes) and rewrites the latest JPEG
in a busy loop. Prints one JSON line: loop fps and process CPU % over the window.

With ``--counter FILE`` it runs until SIGTERM and keeps its frame count in the first 8 bytes of
FILE (native-endian unsigned), so bench/overhead.py can measure it in slices, stopping and
continuing the process (SIGSTOP/SIGCONT) between them.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import struct
import sys
import threading
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from bench.common import MODEL, THREADS, demo_clip  # noqa: E402


class LocalDisplay(threading.Thread):
    """The seed's class, ported to Python 3 (bytes, 'wb'); otherwise as written."""

    def __init__(self, resolution: str, path: str) -> None:
        super().__init__(daemon=True)
        sizes = {"1080p": (1920, 1080), "720p": (1280, 720), "480p": (858, 480)}
        self.resolution = sizes[resolution]
        self.path = path
        self.frame = cv2.imencode(".jpg", 255 * np.ones([640, 480, 3]))[1]
        self.stop_request = threading.Event()
        self.writes = 0

    def run(self) -> None:
        if not os.path.exists(self.path):
            os.mkfifo(self.path)
        with open(self.path, "wb") as fifo_file:  # blocks until a reader opens the FIFO
            while not self.stop_request.is_set():
                try:
                    fifo_file.write(self.frame.tobytes())
                    self.writes += 1
                except OSError:
                    continue

    def set_frame_data(self, frame: np.ndarray) -> None:
        ret, jpeg = cv2.imencode(".jpg", cv2.resize(frame, self.resolution))
        if not ret:
            raise Exception("Failed to set frame data")
        self.frame = jpeg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="")
    parser.add_argument("--source-fps", type=float, default=0.0)
    parser.add_argument("--fifo", required=True)
    parser.add_argument("--mqtt", required=True, help="mqtt://127.0.0.1:PORT")
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--counter", default="", help="run until SIGTERM, counting frames here")
    args = parser.parse_args()

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from inference.models import load_model
    from inference.settings import Settings
    from inference.sources import make_source

    url = urllib.parse.urlsplit(args.mqtt)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="seed-baseline")
    client.connect(url.hostname or "127.0.0.1", url.port or 1883)
    client.loop_start()
    iot_topic = "$aws/things/seed-baseline/infer"
    local_display = LocalDisplay("480p", args.fifo)
    local_display.start()
    model = load_model(Settings(model=MODEL, threads=int(THREADS)))
    labels = model.info.labels
    num_top_k = 5
    src = make_source(args.source or demo_clip(), fps=args.source_fps)
    src.open()
    me = psutil.Process()

    def step() -> None:
        frame = src.read()
        if frame is None:
            raise Exception("Failed to get frame from the stream")
        parsed_inference_results = model.parse(model.infer(model.preprocess(frame)))
        top_k = parsed_inference_results["classification"][0:num_top_k]
        cv2.putText(frame, labels.get(top_k[0]["label"], "?"), (10, 70),
                    cv2.FONT_HERSHEY_SIMPLEX, 3, (255, 165, 20), 8)
        local_display.set_frame_data(frame)
        cloud_output = {labels.get(obj["label"], str(obj["label"])): obj["prob"] for obj in top_k}
        info = client.publish(iot_topic, json.dumps(cloud_output))
        info.wait_for_publish(2.0)

    try:
        if args.counter:
            with open(args.counter, "r+b") as f:
                counter = mmap.mmap(f.fileno(), 8)
            frames = 0
            while True:  # until SIGTERM (bench.common turns it into SystemExit: finally runs)
                step()
                frames += 1
                struct.pack_into("Q", counter, 0, frames)
        end_warm = time.monotonic() + args.warmup
        while time.monotonic() < end_warm:
            step()
        cpu0, t0, frames = sum(me.cpu_times()[:2]), time.monotonic(), 0
        writes0 = local_display.writes
        while time.monotonic() - t0 < args.window:
            step()
            frames += 1
        elapsed = time.monotonic() - t0
        cpu = sum(me.cpu_times()[:2]) - cpu0
        print(json.dumps({"fps": frames / elapsed, "cpu_percent": 100.0 * cpu / elapsed,
                          "fifo_writes_per_s": (local_display.writes - writes0) / elapsed}), flush=True)
    finally:
        local_display.stop_request.set()
        src.close()
        client.disconnect()
        client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
