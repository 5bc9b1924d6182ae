"""Recording on a machine busy enough to starve the encoder: are events still right, and on time?

    python bench/busy_recording.py [--busy 0 2] [--seconds 40] [--tree PATH]

The service in this process (catdog on ONNX Runtime, ``--iot off``, ``--fifo off``) on a
slideshow of coffee, the cat and the rocket, 2.5 s each (skimage's pictures at 640x360), with
``--record cat:0.5 --pre-roll 2 --post-roll 1.5 --record-debounce 2 --record-fps 10`` at 480p,
for ``--seconds``, once per ``--busy`` count of busy loops (``while True: pass`` processes at
the dashboard's own priority: a machine fully used by something else; ffmpeg runs below them).

Per event: its length (the cat is shown 2.5 s, so about 2.5 s plus up to a frame is right),
how long after its end the ``end`` notice went out, and the clip's frames and dropped frames.
``--tree`` runs another checkout's ``inference`` (e.g. a worktree of an older commit) the same way.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List


def slideshow(folder: Path) -> None:
    import cv2
    from skimage import data

    pictures = {"1-coffee.png": data.coffee(), "2-cat.png": data.chelsea(), "3-rocket.png": data.rocket()}
    for name, rgb in pictures.items():
        cv2.imwrite(str(folder / name), cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), (640, 360)))


def run(busy: int, seconds: float, work: Path) -> List[Dict[str, Any]]:
    from inference.events.store import EventStore
    from inference.service import Service
    from inference.settings import Settings

    data_dir = work / f"data-{busy}"
    settings = Settings(source=str(work / "photos"), slide_interval=2.5, model="catdog",
                        record=("cat:0.5",), pre_roll=2.0, post_roll=1.5, record_debounce=2,
                        record_fps=10.0, data_dir=str(data_dir), display_res="480p", fifo="off",
                        iot="off", log_level="warning")
    ends: Dict[int, float] = {}
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    service = Service.build(settings)
    try:
        service.prepare(strict=True)
        recorder = service.recorder
        assert recorder is not None

        def noticed(kind: str, payload: Dict[str, Any]) -> None:
            if kind == "end":
                ends.setdefault(payload["after"]["id"], time.time())

        recorder.listeners.append(noticed)
        service.start()
        time.sleep(seconds)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
        service.stop(time.monotonic() + 120)
    dropped = recorder.stats().get("clip_frames_dropped", "n/a")
    store = EventStore(data_dir)
    store.open()
    try:
        rows = []
        for event in sorted(store.list(), key=lambda e: e.id):
            if event.end is None or event.end_reason != "gone":
                continue  # cut by the end of the run
            rows.append({"id": event.id, "length_s": round(event.end - event.start, 2),
                         "notice_lag_s": round(ends[event.id] - event.end, 1) if event.id in ends else None,
                         "clip_mb": round(event.bytes / 1e6, 2), "dropped_total": dropped})
        return rows
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    work = Path(tempfile.mkdtemp(prefix="busy-recording-"))
    try:
        (work / "photos").mkdir()
        slideshow(work / "photos")
        for busy in args.busy:
            rows = run(busy, args.seconds, work)
            lengths = [r["length_s"] for r in rows]
            lags = [r["notice_lag_s"] for r in rows if r["notice_lag_s"] is not None]
            dropped = rows[0]["dropped_total"] if rows else 0
            sys.stdout.write(f"busy loops {busy}: {len(rows)} events, lengths {lengths} s, end notices "
                             f"{lags} s after the end, clip frames dropped {dropped}\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
