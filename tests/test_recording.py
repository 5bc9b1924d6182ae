"""Recording with the real parts: a real image slideshow through the built-in catdog model, the
clip read back by ffprobe, the notices received from a real mosquitto, and a kill -9 in mid-event
followed by a start that closes the event with a playable clip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import cv2
import psutil
import pytest

from inference.events.store import CLOSED, INTERRUPTED, EventStore
from inference.service import Service
from inference.settings import Settings
from tests.conftest import ROOT, free_port, require_tool, wait_for
from tests.test_iot import Broker, broker, brokers, subscribers  # noqa: F401  (fixtures)

# On the device too: CI runs these again under Python 3.7 on the installed bundle.
pytestmark = pytest.mark.device


def ffprobe(path: Path) -> Dict[str, Any]:
    out = subprocess.run([require_tool("ffprobe"), "-v", "error", "-show_entries",
                          "stream=codec_name,width,height:format=duration", "-of", "json", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


@pytest.fixture
def slideshow(tmp_path: Path, chelsea_bgr: Any) -> Path:
    """No animal, the cat, no animal again: catdog says neither, cat (0.9), neither."""
    from skimage import data

    folder = tmp_path / "photos"
    folder.mkdir()
    pictures = {"1-coffee.png": cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR), "2-cat.png": chelsea_bgr,
                "3-rocket.png": cv2.cvtColor(data.rocket(), cv2.COLOR_RGB2BGR)}
    for name, image in pictures.items():  # one size, as a camera's frames
        cv2.imwrite(str(folder / name), cv2.resize(image, (640, 360)))
    return folder




def test_a_cat_in_a_slideshow_is_an_event_with_its_clip_snapshots_and_notices(
        slideshow: Path, tmp_path: Path, broker: Broker, subscribers: Any) -> None:  # noqa: F811
    pre_roll, post_roll, fps = 2.0, 1.5, 10.0
    settings = Settings(
        source=str(slideshow), slide_interval=2.5, model="catdog", record=("cat:0.5",),
        pre_roll=pre_roll, post_roll=post_roll, record_debounce=2, record_fps=fps,
        data_dir=str(tmp_path / "data"), display_res="480p", fifo="off", iot="mqtt",
        mqtt=f"mqtt://127.0.0.1:{broker.port}", thing_name="cam1", log_level="warning")
    sub = subscribers(broker.port, "cam1", topics=["deeplens/cam1/events"])
    service = Service.build(settings)
    service.prepare(strict=True)
    service.start()
    try:
        store = service.outputs[-1].store  # the recorder's
        closed = wait_for(lambda: [e for e in store.list() if e.state == CLOSED], 40, "an event")
    finally:
        service.stop()
    event = closed[-1]
    assert event.label == "cat" and event.best_prob > 0.5 and event.model == "catdog"
    assert event.source is not None and event.source["name"] == "2-cat.png"
    assert event.end is not None and 2.0 <= event.end - event.start <= 2.5 + post_roll + 1.0
    # the clip: H.264 in MP4, from pre-roll before the start to the end, within a frame or two
    clip = store.clip_path(event.id)
    info = ffprobe(clip)
    assert info["streams"][0]["codec_name"] == "h264"
    expected = event.end - event.start + pre_roll
    assert float(info["format"]["duration"]) == pytest.approx(expected, abs=2 / fps)  # two frames
    # the best frame, as shown and clean, at the display size
    shown = cv2.imread(str(store.snapshot_path(event.id)))
    clean = cv2.imread(str(store.snapshot_path(event.id, clean=True)))
    assert shown is not None and clean is not None and shown.shape == clean.shape
    assert (shown.shape[1], shown.shape[0]) == (info["streams"][0]["width"], info["streams"][0]["height"])
    assert cv2.absdiff(shown, clean).mean() > 0.5  # the overlay is on one only
    # the notices, Frigate's shape: new, then (maybe) updates, then end, for this event
    messages = wait_for(lambda: [json.loads(p) for _, p, _ in list(sub.messages)
                                 if json.loads(p)["type"] == "end"] and
                        [json.loads(p) for _, p, _ in list(sub.messages)], 10, "the end notice")
    kinds = [m["type"] for m in messages if m["after"]["id"] == event.id]
    assert kinds[0] == "new" and kinds[-1] == "end" and set(kinds[1:-1]) <= {"update"}
    end = [m for m in messages if m["type"] == "end" and m["after"]["id"] == event.id][0]
    assert end["after"]["label"] == "cat" and not end["after"]["in_progress"]
    assert end["after"]["has_clip"] and end["before"]["in_progress"]


def _children(pid: int) -> List[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_a_kill_in_mid_event_is_closed_at_the_next_start_with_a_playable_clip(
        tmp_path: Path, chelsea_bgr: Any) -> None:
    require_tool("ffmpeg")
    folder = tmp_path / "cat"
    folder.mkdir()
    cv2.imwrite(str(folder / "cat.png"), chelsea_bgr)  # always a cat: the event never ends by itself
    data_dir = tmp_path / "data"
    command = [sys.executable, "-m", "app", "serve", "--source", str(folder), "--model", "catdog",
               "--record", "cat:0.5", "--record-debounce", "1", "--pre-roll", "1",
               "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(free_port()),
               "--fifo", "off", "--iot", "off", "--token-file", "off", "--log-level", "warning"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    encoders: List[psutil.Process] = []
    try:
        part = wait_for(lambda: [p for p in (data_dir / "clips").glob("*.part.mp4")
                                 if p.stat().st_size > 20_000], 60, "a clip being written")[0]
        encoders = [c for c in _children(proc.pid) if "ffmpeg" in " ".join(c.cmdline())]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
    # the encoder sees its input end and finishes; never left running
    gone, alive = psutil.wait_procs(encoders, timeout=20)
    for leftover in alive:
        leftover.kill()
    assert not alive
    event_id = int(part.name.split(".")[0])
    store = EventStore(data_dir)
    assert store.open() == [event_id]  # what the next start does first
    record = store.get(event_id)
    store.close()
    assert record is not None and record.state == INTERRUPTED and record.end is not None
    clip = data_dir / "clips" / f"{event_id}.mp4"
    assert clip.exists() and not part.exists()
    assert float(ffprobe(clip)["format"]["duration"]) >= 1.0
    assert os.path.exists(data_dir / "snapshots" / f"{event_id}.jpg")
