"""Events, the parts one by one: rules, the tracker frame by frame, the SQLite store and its
retention, and clips read back by ffprobe."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, List, Sequence

import cv2
import numpy as np
import pytest

from inference.events.clip import FfmpegClip, clip_kind, salvage
from inference.events.rules import Rule, RuleError, parse_rule
from inference.events.store import CLOSED, INTERRUPTED, EventStore
from inference.events.tracker import Tracker, Transition
from inference.result import Item
from tests.conftest import require_tool, wait_for

# On the device too: CI runs these again under Python 3.7 on the installed bundle.
pytestmark = pytest.mark.device


# -- rules -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, rule", [
    ("person", Rule("person")), ("Person:0.6", Rule("person", 0.6)), ("any", Rule("any")),
    ("15:0.5", Rule("15", 0.5)), ("dining table:0.25", Rule("dining table", 0.25)),
])
def test_rules_parse(text: str, rule: Rule) -> None:
    assert parse_rule(text) == rule


@pytest.mark.parametrize("text", ["", ":0.5", "cat:2", "cat:x", "cat:nan"])
def test_bad_rules_are_refused(text: str) -> None:
    with pytest.raises(RuleError):
        parse_rule(text)


def test_a_rule_matches_by_name_or_id_at_its_minimum() -> None:
    assert Rule("cat").matches(1, "Cat", 0.01)
    assert Rule("1", 0.5).matches(1, "cat", 0.5) and not Rule("1", 0.5).matches(1, "cat", 0.49)
    assert Rule("any").matches(7, "dog", 0.3) and not Rule("dog").matches(7, "cat", 0.9)


# -- the tracker, frame by frame -------------------------------------------------------------------
def items(*pairs: tuple) -> List[Item]:
    return [Item(label=i, name=name, prob=prob) for i, (name, prob) in enumerate(pairs)]


def run(tracker: Tracker, frames: Sequence[tuple]) -> List[Transition]:
    out: List[Transition] = []
    for at, found in frames:
        out += tracker.feed(at, found)
    return out


def test_an_event_starts_after_debounce_frames_at_the_first_and_ends_after_post_roll() -> None:
    tracker = Tracker([Rule("cat")], debounce=3, post_roll=2.0)
    frames = [(0.0, items(("cat", 0.9))), (0.1, [])]  # one stray frame: nothing
    frames += [(1.0 + i / 10, items(("cat", 0.6 + i / 100))) for i in range(10)]
    frames += [(2.0 + i / 10, []) for i in range(30)]
    out = run(tracker, frames)
    assert [(t.kind, round(t.at, 2)) for t in out if t.kind != "update"] == [("start", 1.0), ("end", 3.9)]
    assert out[0].prob == pytest.approx(0.62)  # the best of the debounce frames
    updates = [t for t in out if t.kind == "update"]
    assert updates and updates[-1].prob == pytest.approx(0.69)
    assert out[-1].prob == pytest.approx(0.69) and out[-1].reason == "gone"


def test_a_long_event_is_split_and_a_flickering_label_waits_for_the_cooldown() -> None:
    tracker = Tracker([Rule("cat")], debounce=1, post_roll=1.0, max_length=5.0, cooldown=3.0)
    out = run(tracker, [(t / 10, items(("cat", 0.9))) for t in range(0, 120)])
    kinds = [(t.kind, round(t.at, 1), t.reason) for t in out if t.kind != "update"]
    assert kinds == [("start", 0.0, ""), ("end", 5.0, "max_length"), ("start", 5.0, ""),
                     ("end", 10.0, "max_length"), ("start", 10.0, "")]
    tracker = Tracker([Rule("cat")], debounce=1, post_roll=1.0, cooldown=3.0)
    frames = [(0.0, items(("cat", 0.9))), (1.5, []), (2.0, items(("cat", 0.9))), (4.6, items(("cat", 0.9)))]
    out = run(tracker, frames)
    assert [(t.kind, t.at) for t in out] == [("start", 0.0), ("end", 1.5), ("start", 4.6)]


def test_any_gives_each_label_its_own_event_and_a_minimum_filters() -> None:
    tracker = Tracker([Rule("any", 0.5)], debounce=1, post_roll=1.0)
    out = run(tracker, [(0.0, items(("dog", 0.8), ("cat", 0.4))), (0.5, items(("cat", 0.7)))])
    assert sorted((t.kind, t.label) for t in out) == [("start", "cat"), ("start", "dog")]
    assert tracker.active_labels and set(tracker.active_labels) == {"cat", "dog"}
    ended = tracker.end_all(1.0)
    assert sorted((t.label, t.reason) for t in ended) == [("cat", "stopped"), ("dog", "stopped")]


# -- the store ---------------------------------------------------------------------------------------
def test_the_store_keeps_events_across_reopening_and_filters_them(tmp_path: Path) -> None:
    store = EventStore(tmp_path)
    assert store.open() == []
    ids = [store.create(label, start, 0.8, (1, 2, 3, 4) if label == "face" else None, "m",
                        {"name": "a.jpg", "path": "/x/a.jpg"}, "h264")
           for label, start in (("cat", 100.0), ("face", 200.0), ("cat", 300.0))]
    for event_id, end in zip(ids, (110.0, 210.0, 310.0)):
        store.finish(event_id, end, "gone")
    store.close()
    store = EventStore(tmp_path)
    assert store.open() == []
    assert [e.id for e in store.list()] == ids[::-1]  # newest first
    assert [e.id for e in store.list(label="cat")] == [ids[2], ids[0]]
    assert [e.id for e in store.list(since=150, until=250)] == [ids[1]]
    assert [e.id for e in store.list(limit=1)] == [ids[2]]
    face = store.get(ids[1])
    assert face is not None and face.state == CLOSED and face.box == (1, 2, 3, 4)
    data = face.to_json()
    assert data["duration"] == 10.0 and data["box"] == {"xmin": 1, "ymin": 2, "xmax": 3, "ymax": 4}
    assert data["source"] == {"name": "a.jpg", "path": "/x/a.jpg"} and not data["in_progress"]
    assert store.delete(ids[1]) is True and store.get(ids[1]) is None and store.delete(ids[1]) is None
    store.close()


def test_an_event_left_open_is_closed_at_the_next_open_at_its_last_touch(tmp_path: Path) -> None:
    store = EventStore(tmp_path)
    store.open()
    event_id = store.create("cat", time.time() - 5, 0.9, None, "m", None, "h264")
    store.touch(event_id)
    touched = store.get(event_id).touched  # type: ignore[union-attr]
    assert store.delete(event_id) is False  # in progress: kept
    store.close()  # as if the process died: nothing finished it
    store = EventStore(tmp_path)
    assert store.open() == [event_id]
    record = store.get(event_id)
    assert record is not None and record.state == INTERRUPTED and record.end == touched
    store.close()


def test_a_second_dashboard_on_the_folder_leaves_the_firsts_open_event_alone(tmp_path: Path) -> None:
    first = EventStore(tmp_path)
    first.open()
    event_id = first.create("cat", time.time(), 0.9, None, "m", None, "h264")
    second = EventStore(tmp_path)  # another dashboard, same --data-dir: its own flock
    assert second.open() == []
    assert second.get(event_id).state == "open"  # type: ignore[union-attr]
    second.close()
    first.close()  # the first dies with its event open: nobody else holds the folder now
    third = EventStore(tmp_path)
    assert third.open() == [event_id]
    assert third.get(event_id).state == INTERRUPTED  # type: ignore[union-attr]
    third.close()


def test_retention_deletes_the_oldest_by_age_then_size_never_the_open_one(tmp_path: Path) -> None:
    store = EventStore(tmp_path)
    store.open()
    now = 1_000_000.0
    ids = []
    for age_days in (40, 20, 10, 5):
        event_id = store.create("cat", now - age_days * 86400, 0.9, None, "m", None, "h264")
        store.snapshot_path(event_id).write_bytes(b"x" * 400_000)
        store.finish(event_id, now - age_days * 86400 + 10, "gone")
        ids.append(event_id)
    open_id = store.create("cat", now - 50 * 86400, 0.9, None, "m", None, "h264")  # oldest, open
    store.snapshot_path(open_id).write_bytes(b"x" * 400_000)
    assert store.prune(retain_days=30, retain_mb=0, now=now) == [ids[0]]
    assert store.prune(retain_days=30, retain_mb=1.0, now=now) == [ids[1], ids[2]]  # 2 MB -> 0.8
    assert {e.id for e in store.list()} == {ids[3], open_id}
    assert not store.snapshot_path(ids[0]).exists() and store.snapshot_path(ids[3]).exists()
    store.close()


# -- clips -------------------------------------------------------------------------------------------
def _ffprobe(path: Path) -> dict:
    ffprobe = require_tool("ffprobe")
    out = subprocess.run([ffprobe, "-v", "error", "-show_entries",
                          "stream=codec_name,width,height,nb_frames:format=duration,format_name",
                          "-of", "json", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def _jpegs(count: int, size: tuple = (320, 240)) -> List[bytes]:
    frames = []
    for i in range(count):
        image = np.full((size[1], size[0], 3), (i * 7) % 255, np.uint8)
        cv2.putText(image, str(i), (20, 100), cv2.FONT_HERSHEY_SIMPLEX, 2, (255, 255, 255), 3)
        frames.append(bytes(cv2.imencode(".jpg", image)[1].tobytes()))
    return frames


def test_an_ffmpeg_clip_is_h264_mp4_of_the_frames_written(tmp_path: Path) -> None:
    require_tool("ffmpeg")
    assert clip_kind() == "h264"
    clip = FfmpegClip(tmp_path / "1.part.mp4", tmp_path / "1.mp4", 10.0)
    for jpeg in _jpegs(35):
        clip.write(jpeg)
    assert clip.close()
    assert not (tmp_path / "1.part.mp4").exists()
    info = _ffprobe(tmp_path / "1.mp4")
    stream = info["streams"][0]
    assert stream["codec_name"] == "h264" and (stream["width"], stream["height"]) == (320, 240)
    assert int(stream["nb_frames"]) == 35
    assert float(info["format"]["duration"]) == pytest.approx(3.5, abs=0.15)


def test_a_clip_cut_short_by_a_kill_is_playable_up_to_what_was_written(tmp_path: Path) -> None:
    require_tool("ffmpeg")
    clip = FfmpegClip(tmp_path / "2.part.mp4", tmp_path / "2.mp4", 10.0)
    for jpeg in _jpegs(40):
        clip.write(jpeg)
    clip._proc.stdin.flush()  # type: ignore[union-attr]
    time.sleep(1.0)
    clip._proc.kill()  # ffmpeg dies mid-clip: its fragments so far stay readable
    clip._proc.wait()
    clip._err.close()
    assert salvage(tmp_path / "2.part.mp4", tmp_path / "2.mp4")
    info = _ffprobe(tmp_path / "2.mp4")
    assert 1.0 <= float(info["format"]["duration"]) <= 4.0


def test_a_wedged_ffmpeg_is_given_up_not_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoder that takes nothing (stopped here with SIGSTOP) must not hang the recorder."""
    import signal

    from inference.events import clip as clip_module
    from inference.events.clip import ClipError

    require_tool("ffmpeg")
    monkeypatch.setattr(clip_module, "WRITE_SECONDS", 1.0)
    clip = FfmpegClip(tmp_path / "3.part.mp4", tmp_path / "3.mp4", 10.0)
    frames = _jpegs(4, size=(640, 480))
    clip._proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(ClipError, match="took no frame"):
            for i in range(2000):  # the pipe fills within a few dozen frames, then 1 s
                clip.write(frames[i % 4])
    finally:
        clip._proc.send_signal(signal.SIGCONT)
    started = time.monotonic()
    clip.close()
    assert time.monotonic() - started < 10 and clip._proc.poll() is not None


def test_a_starved_encoder_holds_up_no_writer_and_its_backlog_is_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorder writes through a QueuedClip: an encoder that takes nothing for a while (a
    busy machine; SIGSTOP here) costs frames beyond the backlog, never a wait or the clip."""
    import signal

    from inference.events import clip as clip_module
    from inference.events.clip import QueuedClip

    require_tool("ffmpeg")
    # were write() to wait for the encoder, the stopped one would fail it within 1 s
    monkeypatch.setattr(clip_module, "WRITE_SECONDS", 1.0)
    frames = _jpegs(4, size=(640, 480))
    inner = FfmpegClip(tmp_path / "4.part.mp4", tmp_path / "4.mp4", 10.0)
    clip = QueuedClip(inner, "clip-4", max_bytes=20 * len(frames[0]))
    assert clip._thread.name == "clip-4" and clip._thread.is_alive()
    inner._proc.send_signal(signal.SIGSTOP)
    try:
        for i in range(200):
            clip.write(frames[i % 4])
        assert 0 < clip._bytes <= 20 * len(frames[0])
        assert clip.dropped > 100, clip.dropped
    finally:
        inner._proc.send_signal(signal.SIGCONT)
    # a few more once it runs again: kept, after the backlog
    monkeypatch.setattr(clip_module, "WRITE_SECONDS", 30.0)
    assert wait_for(lambda: clip.backlog == 0, 30, "the backlog to drain")
    for jpeg in frames:
        clip.write(jpeg)
    assert clip.close() and not clip._thread.is_alive()
    info = _ffprobe(tmp_path / "4.mp4")
    assert int(info["streams"][0]["nb_frames"]) == 200 - clip.dropped + 4 == inner.frames


def test_a_failed_encoder_shows_at_the_next_write(tmp_path: Path) -> None:
    from inference.events.clip import ClipError, QueuedClip

    require_tool("ffmpeg")
    inner = FfmpegClip(tmp_path / "5.part.mp4", tmp_path / "5.mp4", 10.0)
    clip = QueuedClip(inner, "clip-5")
    inner._proc.kill()
    inner._proc.wait()
    with pytest.raises(ClipError, match="ffmpeg stopped"):
        for jpeg in _jpegs(200):
            clip.write(jpeg)
            time.sleep(0.01)
    clip.close()
    assert not clip._thread.is_alive()


def test_the_tracker_sees_every_result_while_the_recorder_is_busy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Results published while the recorder's thread is held up (a slow disk or encoder) still
    reach the tracker in order: the event starts and ends at the right results, not at the
    newest one the thread happens to find when it is free again."""
    import threading

    from inference.events.recorder import Recorder, RecordOptions
    from inference.pipeline.frames import FrameHub
    from inference.result import Result
    from inference.types import ModelInfo

    info = ModelInfo("catdog", "classification", 224, 224, "onnx", {0: "dog", 1: "cat"})
    hub = FrameHub(80)
    store = EventStore(tmp_path / "data")
    recorder = Recorder(RecordOptions([parse_rule("cat:0.5")], res="480p", fps=10.0, pre_roll=0.5,
                                      post_roll=0.5, debounce=2, cooldown=0.0), hub, store)
    held, release = threading.Event(), threading.Event()
    jpeg = recorder._jpeg
    calls = []

    def slow_jpeg(frame: Any) -> Any:
        calls.append(frame)
        if len(calls) == 2:
            held.set()
            release.wait(30)
        return jpeg(frame)

    monkeypatch.setattr(recorder, "_jpeg", slow_jpeg)
    t0 = time.time() - 60
    image = np.zeros((240, 320, 3), np.uint8)

    def publish(seq: int, cat: bool) -> None:
        found = (Item(1, "cat", 0.9),) if cat else (Item(0, "dog", 0.1),)
        hub.publish(image, Result(seq=seq, timestamp=t0 + seq / 10, model=info, frame_size=(320, 240),
                                  items=found))

    recorder.start()
    try:
        publish(1, False)
        wait_for(lambda: len(calls) == 1, 10, "the first frame")
        publish(2, False)
        assert held.wait(10), "the recorder never took the second frame"
        for seq in range(3, 9):  # the cat from 0.3 s to 0.8 s, while the thread is held up
            publish(seq, True)
        for seq in range(9, 31):
            publish(seq, False)
        release.set()
        closed = wait_for(lambda: [e for e in store.list() if e.state == CLOSED], 30, "the event")
    finally:
        release.set()
        recorder.stop(time.monotonic() + 30)
    event = closed[0]
    assert event.label == "cat" and event.end_reason == "gone"
    assert event.start == pytest.approx(t0 + 0.3) and event.end == pytest.approx(t0 + 1.3)
