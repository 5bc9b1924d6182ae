"""The event API on a real uvicorn: the history newest first and filtered, one event, its
snapshots and its clip (HTTP Range), DELETE with the token, --protect-views, a restart that keeps
the history, and a full disk that stops recording with a /health reason while the loop goes on."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, List

import cv2
import numpy as np
import pytest

from inference.events.store import EventStore
from inference.outputs import build_outputs
from inference.service import Service
from tests.conftest import wait_for
from tests.test_server import TOKEN, fake_model_factory, serve_runtime, server_settings

# On the device too: CI runs these again under Python 3.7 on the installed bundle.
pytestmark = pytest.mark.device


def _seed_history(data_dir: Path) -> List[int]:
    """Three closed events with real files, as a recorder leaves them."""
    store = EventStore(data_dir)
    store.open()
    ids = []
    for label, start in (("cat", 1_700_000_000.0), ("dog", 1_700_000_100.0), ("cat", 1_700_000_200.0)):
        event_id = store.create(label, start, 0.9, None, "catdog", {"name": "a.png", "path": "/p/a.png"},
                                "h264")
        image = np.full((240, 320, 3), 60 if label == "cat" else 200, np.uint8)
        store.snapshot_path(event_id).write_bytes(bytes(cv2.imencode(".jpg", image)[1].tobytes()))
        store.snapshot_path(event_id, clean=True).write_bytes(
            bytes(cv2.imencode(".jpg", image + 10)[1].tobytes()))
        store.clip_path(event_id).write_bytes(bytes(range(256)) * 40)  # 10240 bytes to range over
        store.finish(event_id, start + 12.5, "gone")
        ids.append(event_id)
    store.close()
    return ids


@pytest.fixture
def history(tmp_path: Path) -> Iterator[Any]:
    data_dir = tmp_path / "data"
    ids = _seed_history(data_dir)
    settings = server_settings(data_dir=str(data_dir))
    service = Service(settings)
    with serve_runtime(service) as running:
        yield running, ids


def test_the_history_newest_first_filtered_and_one_event(history: Any) -> None:
    srv, ids = history
    with srv.client() as client:
        body = client.get("/api/events").json()
        assert [e["id"] for e in body["events"]] == ids[::-1]
        assert body["labels"] == ["cat", "dog"] and body["recording"] is None
        assert [e["id"] for e in client.get("/api/events", params={"label": "cat"}).json()["events"]] \
            == [ids[2], ids[0]]
        since = client.get("/api/events", params={"since": "2023-11-14T22:15:00Z"}).json()["events"]
        assert [e["id"] for e in since] == [ids[2], ids[1]]  # 1_700_000_100 is 22:15:00 UTC
        assert [e["id"] for e in client.get("/api/events", params={"until": 1_700_000_050,
                                                                    "limit": 5}).json()["events"]] == [ids[0]]
        assert len(client.get("/api/events", params={"limit": 1}).json()["events"]) == 1
        one = client.get(f"/api/events/{ids[1]}").json()
        assert one["label"] == "dog" and one["duration"] == 12.5 and one["source"]["name"] == "a.png"
        assert one["clip_url"] == f"/api/events/{ids[1]}/clip.mp4"
        assert one["snapshot_url"] == f"/api/events/{ids[1]}/snapshot.jpg"
        missing = client.get("/api/events/999")
        assert missing.status_code == 404 and "999" in missing.json()["detail"]
        bad = client.get("/api/events", params={"limit": 0})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "limit"]
        bad = client.get("/api/events", params={"since": "yesterday"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "since"]


def test_snapshots_and_the_clip_with_ranges(history: Any) -> None:
    srv, ids = history
    with srv.client() as client:
        shown = client.get(f"/api/events/{ids[0]}/snapshot.jpg")
        clean = client.get(f"/api/events/{ids[0]}/snapshot.jpg", params={"clean": 1})
        assert shown.headers["content-type"] == "image/jpeg" and shown.content != clean.content
        assert cv2.imdecode(np.frombuffer(clean.content, np.uint8), cv2.IMREAD_COLOR).shape == (240, 320, 3)
        whole = client.get(f"/api/events/{ids[0]}/clip.mp4")
        assert whole.status_code == 200 and whole.headers["accept-ranges"] == "bytes"
        assert whole.headers["content-type"] == "video/mp4" and len(whole.content) == 10240
        part = client.get(f"/api/events/{ids[0]}/clip.mp4", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.headers["content-range"] == "bytes 100-199/10240"
        assert part.content == whole.content[100:200]
        tail = client.get(f"/api/events/{ids[0]}/clip.mp4", headers={"Range": "bytes=-16"})
        assert tail.status_code == 206 and tail.content == whole.content[-16:]
        open_end = client.get(f"/api/events/{ids[0]}/clip.mp4", headers={"Range": "bytes=10000-"})
        assert open_end.content == whole.content[10000:]
        beyond = client.get(f"/api/events/{ids[0]}/clip.mp4", headers={"Range": "bytes=20000-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == "bytes */10240"


def test_delete_needs_the_token_and_removes_the_files(history: Any, tmp_path: Path) -> None:
    srv, ids = history
    with srv.client() as anonymous, srv.client(TOKEN) as owner:
        assert anonymous.delete(f"/api/events/{ids[0]}").status_code == 401
        assert owner.delete(f"/api/events/{ids[0]}").status_code == 204
        assert owner.get(f"/api/events/{ids[0]}").status_code == 404
        assert owner.delete(f"/api/events/{ids[0]}").status_code == 404
    assert not (tmp_path / "data" / "clips" / f"{ids[0]}.mp4").exists()
    assert not (tmp_path / "data" / "snapshots" / f"{ids[0]}.jpg").exists()


def test_views_follow_protect_views(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ids = _seed_history(data_dir)
    service = Service(server_settings(data_dir=str(data_dir), protect_views=True))
    with serve_runtime(service) as srv, srv.client() as anonymous, srv.client(TOKEN) as owner:
        for path in ("/api/events", f"/api/events/{ids[0]}", f"/api/events/{ids[0]}/snapshot.jpg",
                     f"/api/events/{ids[0]}/clip.mp4"):
            assert anonymous.get(path).status_code == 401, path
            assert owner.get(path).status_code == 200, path


def _recording(tmp_path: Path, data_dir: Path, **overrides: Any) -> Service:
    folder = tmp_path / "frames"
    folder.mkdir(exist_ok=True)
    cv2.imwrite(str(folder / "bright.png"), np.full((240, 320, 3), 250, np.uint8))
    settings = server_settings(str(folder), data_dir=str(data_dir), record=("class0:0.4",),
                               record_debounce=1, pre_roll=0.5, post_roll=0.5, **overrides)
    service = Service(settings, model_factory=fake_model_factory)  # class0 at 0.5 on every frame
    service.outputs = build_outputs(settings, service.hub)
    service.prepare(strict=True)
    return service




def test_a_restart_keeps_the_history(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = _recording(tmp_path, data_dir)  # the fake model says class0 at 0.5 on every frame
    with serve_runtime(first) as srv, srv.client() as client:
        seen = wait_for(lambda: client.get("/api/events").json()["events"])
        assert seen[0]["in_progress"] and seen[0]["label"] == "class0"
        event_id = seen[0]["id"]
    # Stopping gives the recorder the service's 2 s; a loaded machine may need longer to finish
    # the clip, and until it has, the event is rightly still open (the next start would close it
    # as interrupted once this one's lock is gone).
    recorder = first.recorder
    assert recorder is not None and recorder.join(time.monotonic() + 60), "the recorder never ended"
    again = _recording(tmp_path, data_dir)
    with serve_runtime(again) as srv, srv.client() as client:
        old = client.get(f"/api/events/{event_id}").json()
        assert old["state"] == "closed" and old["end_reason"] == "stopped" and old["has_clip"]


def test_a_full_disk_stops_recording_with_a_health_reason_and_the_loop_goes_on(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"a small tmpfs is how this test fills a disk: {done.stderr}"
    try:
        service = _recording(tmp_path, mount / "data")
        with serve_runtime(service) as srv, srv.client() as client:
            health = wait_for(lambda: (lambda h: h if h["status"] == "degraded" else None)(
                client.get("/health").json()))
            assert any("recording stopped: disk full" in r for r in health["reasons"]), health
            assert client.get("/api/events").json()["events"] == []
            before = srv.service.hub.seq
            srv.wait_frames(5)  # the loop goes on
            assert srv.service.hub.seq > before
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)
