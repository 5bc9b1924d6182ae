"""/stream.mjpg, /snapshot.jpg and /results/events against a real server: parts, encode-once,
slow and departing viewers, the viewer cap and shutdown with open streams."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import cv2
import httpx
import numpy as np

from tests.conftest import require_tool
from tests.test_server import Part, PartReader, Running, read_parts, running_server


def decode(part: Part) -> np.ndarray:
    assert part.headers["content-type"] == "image/jpeg"
    assert int(part.headers["content-length"]) == len(part.body)
    image = cv2.imdecode(np.frombuffer(part.body, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "a part that is not a JPEG"
    return image


def wait_until(predicate: object, what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` (bounded); fail naming ``what`` if it never holds."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def settle(srv: Running) -> int:
    """After a pause, the seq once the frame that was in flight (if any) has been published."""
    hub = srv.service.hub
    seq = hub.seq
    for _ in range(20):
        item = hub.wait_newer(seq, 0.3)
        if item is None:
            return seq
        seq = item.seq
    raise AssertionError("the loop keeps publishing while paused")


def test_stream_parts_are_jpegs_with_increasing_seq_and_capture_time() -> None:
    with running_server() as srv, srv.client() as client:
        with client.stream("GET", "/stream.mjpg") as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "multipart/x-mixed-replace; boundary=frame"
            assert "no-cache" in response.headers["cache-control"]
            reader = PartReader(response.iter_bytes())
            parts = [reader.next() for _ in range(12)]
        seqs = [p.seq for p in parts]
        assert seqs == sorted(set(seqs)), f"seq must strictly increase: {seqs}"
        for part in parts:
            assert decode(part).shape == (360, 640, 3)
            assert abs(float(part.headers["x-timestamp"]) - time.time()) < 600


def test_results_seq_is_the_seq_of_a_streamed_frame() -> None:
    with running_server() as srv, srv.client(srv.settings.token) as client:
        srv.wait_frames(1)
        assert client.post("/api/pipeline/pause").status_code == 200
        settle(srv)
        seq = client.get("/results").json()["seq"]
        with client.stream("GET", "/stream.mjpg") as response:
            reader = PartReader(response.iter_bytes())
            # Paused: the stream sends the latest frame (and again every ~1 s): that is seq.
            seen = [reader.next().seq for _ in range(2)]
        assert seq in seen and srv.service.hub.seq == seq


def test_res_scales_down_never_up_and_rejects_unknown_names() -> None:
    with running_server(source="synthetic:1280x720@30") as srv, srv.client() as client:
        assert decode(read_parts(client, "/stream.mjpg?res=480p", 1)[0]).shape == (480, 858, 3)
        assert decode(read_parts(client, "/stream.mjpg?res=native", 1)[0]).shape == (720, 1280, 3)
        # 1080p of a 720p frame would only cost CPU: the 720p frame is sent.
        assert decode(read_parts(client, "/stream.mjpg?res=1080p", 1)[0]).shape == (720, 1280, 3)
        bad = client.get("/stream.mjpg?res=999p")
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "res"]
        # fps is a number >= 0 (0 = uncapped): anything else, empty included, is FastAPI's 422.
        for fps in ("fast", "", "-1", "nan"):
            bad = client.get("/stream.mjpg", params={"fps": fps})
            assert bad.status_code == 422, fps
            assert bad.json()["detail"][0]["loc"] == ["query", "fps"], fps
        bad = client.get("/snapshot.jpg?res=999p")
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "res"]
        snap = client.get("/snapshot.jpg?res=480p")
        assert snap.headers["content-type"] == "image/jpeg" and int(snap.headers["x-frame-seq"]) >= 1
        image = cv2.imdecode(np.frombuffer(snap.content, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (480, 858, 3)


def test_fps_cap_is_per_viewer() -> None:
    with running_server() as srv, srv.client() as client:
        with client.stream("GET", "/stream.mjpg?fps=2") as response:
            reader = PartReader(response.iter_bytes())
            reader.next()
            viewers = client.get("/api/stats").json()["viewers"]
        assert [v["fps_cap"] for v in viewers] == [2.0]
        wait_until(lambda: client.get("/api/stats").json()["viewers"] == [], "the viewer to leave")
        with client.stream("GET", "/stream.mjpg?fps=0") as response:  # 0: as the frames come
            reader = PartReader(response.iter_bytes())
            reader.next()
            viewers = client.get("/api/stats").json()["viewers"]
        assert [v["fps_cap"] for v in viewers] == [None]


def test_paused_stream_resends_the_latest_frame() -> None:
    with running_server() as srv, srv.client(srv.settings.token) as client:
        srv.wait_frames(1)
        client.post("/api/pipeline/pause")
        settle(srv)
        with client.stream("GET", "/stream.mjpg") as response:
            reader = PartReader(response.iter_bytes())
            seqs = [reader.next().seq for _ in range(3)]
        assert len(set(seqs)) == 1, seqs
        stats = client.get("/api/stats").json()
        assert stats["jpeg"]["encodes_total"] == 1, "a resend reuses the encoded frame"


def test_no_encode_without_a_consumer() -> None:
    with running_server() as srv, srv.client() as client:
        srv.wait_frames(20)
        for path in ("/results", "/api/stats", "/health", "/metrics", "/"):
            assert client.get(path).status_code == 200
        assert srv.service.hub.total_encodes == 0
        assert client.get("/api/stats").json()["jpeg"]["encodes_total"] == 0
        client.get("/snapshot.jpg")
        assert srv.service.hub.total_encodes == 1


def _watch(url: str, path: str, count: int, out: list[list[int]]) -> None:
    with httpx.Client(base_url=url, timeout=20) as client:
        out.append([p.seq for p in read_parts(client, path, count)])


def test_concurrent_viewers_share_one_encode_per_frame_and_resolution() -> None:
    with running_server(source="synthetic:1280x720@30") as srv:
        hub = srv.service.hub
        srv.wait_frames(1)
        published_before = hub.published
        results: list[list[int]] = []
        paths = ["/stream.mjpg?res=480p", "/stream.mjpg"] * 4
        viewers = [threading.Thread(target=_watch, args=(srv.url, p, 20, results), name=f"viewer{i}")
                   for i, p in enumerate(paths)]
        for v in viewers:
            v.start()
        for v in viewers:
            v.join(60)
        assert len(results) == len(paths)
        published = hub.published - published_before + 1
        sent = sum(len(r) for r in results)
        # Per-viewer encoding would need ~`sent` encodes; shared, at most one per frame and size.
        assert hub.encodes["480p"] <= published and hub.encodes["native"] <= published
        assert hub.total_encodes < sent / 2, (hub.encodes, sent)


def test_slow_viewer_skips_to_the_latest_frame_without_holding_up_the_loop() -> None:
    # Big frames, so the kernel's socket buffers (a few MB on loopback) cannot hold them all.
    with running_server(source="synthetic:1280x720@30", display_res="native") as srv:
        srv.wait_frames(1)
        host, port = srv.url.split("//", 1)[1].split(":")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(20)
            sock.connect((host, int(port)))
            sock.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: x\r\n\r\n")
            start = srv.service.hub.published
            srv.wait_frames(120)  # the viewer reads nothing meanwhile; the loop goes on
            assert srv.service.hub.published - start >= 120

            def chunks() -> Iterator[bytes]:
                data = sock.recv(65536)
                while data:
                    yield data
                    data = sock.recv(65536)

            stream = chunks()
            head = b""
            while b"\r\n\r\n" not in head:
                head += next(stream)
            head, _, rest = head.partition(b"\r\n\r\n")
            assert b"200 OK" in head and b"chunked" in head.lower()
            seqs = [p.seq for p in _dechunked_parts(rest, stream, 150)]
            with srv.client() as client:
                skipped = client.get("/api/stats").json()["viewers"][0]["skipped"]
        assert seqs == sorted(seqs) and skipped > 0
        assert max(b - a for a, b in zip(seqs, seqs[1:])) > 1, f"no frame skipped: {seqs}"


def _dechunked_parts(first: bytes, stream: Iterator[bytes], count: int) -> list[Part]:
    """HTTP/1.1 chunked transfer decoding in front of the multipart reader."""
    buf = bytearray(first)

    def body() -> Iterator[bytes]:
        nonlocal buf
        while True:
            while b"\r\n" not in buf:
                buf += next(stream)
            size_line, _, rest = bytes(buf).partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            buf = bytearray(rest)
            while len(buf) < size + 2:
                buf += next(stream)
            chunk = bytes(buf[:size])
            del buf[:size + 2]
            yield chunk

    reader = PartReader(body())
    return [reader.next() for _ in range(count)]


def test_a_viewer_that_leaves_is_dropped_and_the_others_go_on() -> None:
    with running_server() as srv, srv.client() as client, srv.client() as other:
        with client.stream("GET", "/stream.mjpg") as staying:
            reader = PartReader(staying.iter_bytes())
            first = reader.next().seq
            read_parts(other, "/stream.mjpg", 2)  # joins, reads, hangs up
            wait_until(lambda: len(client.get("/api/stats").json()["viewers"]) == 1, "the drop")
            later = [reader.next().seq for _ in range(5)]
        assert later == sorted(later) and later[0] > first
        wait_until(lambda: client.get("/api/stats").json()["viewers"] == [], "the last drop")


def test_viewer_cap_answers_503_and_frees_the_slot() -> None:
    with running_server(max_viewers=2) as srv, srv.client() as a, srv.client() as b, \
            srv.client() as c:
        with a.stream("GET", "/stream.mjpg") as ra, b.stream("GET", "/stream.mjpg") as rb:
            readers = [PartReader(ra.iter_bytes()), PartReader(rb.iter_bytes())]
            for reader in readers:  # keep them: a dropped iterator closes its connection
                reader.next()
            refused = c.get("/stream.mjpg")
            assert refused.status_code == 503
            assert "too many viewers: 2 are already watching" in refused.json()["detail"]
            assert "--max-viewers" in refused.json()["detail"]
        wait_until(lambda: c.get("/api/stats").json()["viewers"] == [], "slots to free")
        assert len(read_parts(c, "/stream.mjpg", 1)) == 1


def test_sse_delivers_one_event_per_result() -> None:
    with running_server() as srv, srv.client() as client:
        with client.stream("GET", "/results/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events: list[dict[str, object]] = []
            ids: list[int] = []
            names: list[str] = []
            lines = response.iter_lines()
            name = ""
            for line in lines:
                if line.startswith("event:"):
                    name = line.split(":", 1)[1].strip()
                    names.append(name)
                elif line.startswith("id:"):
                    ids.append(int(line.split(":", 1)[1]))
                elif line.startswith("data:") and name == "result":
                    events.append(json.loads(line[5:]))
                    if len(events) == 5:
                        break
        # The live settings and the pipeline state first (test_control), then only results.
        assert names == ["config", "state"] + ["result"] * 5
        seqs = [e["seq"] for e in events]
        assert seqs == ids and seqs == sorted(set(seqs))  # type: ignore[type-var]
        assert all(e["state"] == "running" and "payload" in e and "results" in e for e in events)


def test_shutdown_ends_open_streams() -> None:
    with running_server() as srv:
        ended: list[str] = []

        def watch(path: str) -> None:
            with httpx.Client(base_url=srv.url, timeout=10) as client, client.stream("GET", path) as r:
                for _ in r.iter_bytes():
                    pass
            ended.append(path)

        paths = ["/stream.mjpg", "/stream.mjpg?res=480p", "/stream.mjpg?fps=1", "/results/events"]
        watchers = [threading.Thread(target=watch, args=(p,), name=f"w{i}") for i, p in enumerate(paths)]
        for w in watchers:
            w.start()
        with srv.client() as client:
            def all_connected() -> bool:
                stats = client.get("/api/stats").json()
                return len(stats["viewers"]) == 3 and stats["event_subscribers"] == 1

            wait_until(all_connected, "every stream to connect")
        srv.thread.stop(time.monotonic() + 2.0)
        assert not srv.thread.started
        for w in watchers:
            w.join(2.0)
        assert sorted(ended) == sorted(paths)
        # The server's shutdown leaves the service to its owner (here running_server).
        assert srv.service.loop.state.value == "running"
    assert srv.service.loop.state.value == "stopped"


def test_ffmpeg_reads_the_stream() -> None:
    ffmpeg = require_tool("ffmpeg")
    with running_server() as srv:
        out = subprocess.run(
            [ffmpeg, "-hide_banner", "-loglevel", "error", "-f", "mpjpeg", "-i",
             f"{srv.url}/stream.mjpg", "-frames:v", "5", "-f", "null", "-"],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr



def test_broadcaster_wakes_the_event_loop_only_when_someone_waits() -> None:
    """No viewer: a new frame must not wake the event loop thread; a waiter is still woken."""
    import asyncio

    from app.broadcast import Broadcaster
    from inference.pipeline.frames import FrameHub
    from inference.result import Result

    hub = FrameHub()
    image = np.zeros((8, 8, 3), np.uint8)

    def publish(seq: int) -> None:
        hub.publish(image, Result(seq, time.time(), None, (8, 8)))

    async def scenario() -> tuple[int, int, bool]:
        broadcaster = Broadcaster(hub, asyncio.get_running_loop())
        wakes = 0
        wake = broadcaster._wake

        def counting_wake() -> None:
            nonlocal wakes
            wakes += 1
            wake()

        broadcaster._wake = counting_wake  # type: ignore[method-assign]
        hub.add_listener(broadcaster._listener)
        for seq in (1, 2, 3):
            threading.Thread(target=publish, args=(seq,)).start()
        await asyncio.sleep(0.2)
        idle_wakes = wakes
        waiter = asyncio.create_task(broadcaster.wait_newer(3, time.monotonic() + 5))
        await asyncio.sleep(0.05)
        threading.Thread(target=publish, args=(4,)).start()
        newer = await asyncio.wait_for(waiter, 5)
        return idle_wakes, wakes, newer

    idle_wakes, wakes, newer = asyncio.run(scenario())
    assert idle_wakes == 0
    assert newer and wakes >= 1


def test_an_encode_that_waited_encodes_the_newest_frame() -> None:
    """FrameHub.encode: encodes that queued behind a slow one coalesce into one encode of the
    newest frame, which answers them all (a frame nobody got to is never encoded)."""
    from inference.pipeline.frames import Frame, FrameHub
    from inference.result import Result

    hub = FrameHub()
    rendering, release = threading.Event(), threading.Event()
    image = np.zeros((16, 16, 3), np.uint8)

    def slow_render(raw: np.ndarray) -> np.ndarray:
        rendering.set()
        release.wait(5)  # the encode of frame 1 is busy while 2, 3 and 4 are asked for
        return raw

    first = hub.publish(image, Result(1, time.time(), None, (16, 16)), render=slow_render)
    got: dict[int, int] = {}

    def encode(frame: Frame) -> None:
        encoded = hub.encode("native", frame)
        assert encoded is not None
        got[frame.seq] = encoded.seq

    threads = [threading.Thread(target=encode, args=(first,), name="encode-1")]
    threads[0].start()
    assert rendering.wait(5), "the first encode never started"
    later = [hub.publish(image, Result(seq, time.time(), None, (16, 16))) for seq in (2, 3, 4)]
    for frame in later:
        threads.append(threading.Thread(target=encode, args=(frame,), name=f"encode-{frame.seq}"))
        threads[-1].start()
    time.sleep(0.2)  # let them queue behind the first encode
    release.set()
    for thread in threads:
        thread.join(5)
    assert got == {1: 1, 2: 4, 3: 4, 4: 4}
    assert hub.encodes["native"] == 2 and hub.total_encodes == 2
    assert first.jpeg("native") is not None and later[2].jpeg("native") is not None
    assert later[0].jpeg("native") is None and later[1].jpeg("native") is None  # never encoded
    assert later[2].part("native").startswith(b"--frame\r\n")
    # An encode of a frame already encoded (or older than the last encode) encodes nothing.
    assert hub.encode("native", later[0]) is later[2] and hub.encode("native") is later[2]
    assert hub.encodes["native"] == 2


def test_a_lagging_encoder_skips_to_the_newest_frame() -> None:
    """The viewers' path: requests queued behind a slow encode in the broadcaster's encoder
    threads coalesce: one encode of the newest frame answers them."""
    import asyncio

    from app.broadcast import Broadcaster
    from inference.pipeline.frames import FrameHub
    from inference.result import Result

    hub = FrameHub()
    rendering, release = threading.Event(), threading.Event()
    image = np.zeros((16, 16, 3), np.uint8)

    def slow_render(raw: np.ndarray) -> np.ndarray:
        rendering.set()
        release.wait(5)  # the encoder is busy with frame 1 while 2, 3 and 4 are asked for
        return raw

    async def scenario() -> list[int]:
        broadcaster = Broadcaster(hub, asyncio.get_running_loop())
        broadcaster.attach()
        try:
            first = hub.publish(image, Result(1, time.time(), None, (16, 16)), render=slow_render)
            tasks = [asyncio.ensure_future(broadcaster.encoded(first, "native"))]
            # Off the event loop: the encoder's result is posted back to it.
            assert await asyncio.get_running_loop().run_in_executor(None, rendering.wait, 5), (
                "the encoder never started")
            for seq in (2, 3, 4):
                frame = hub.publish(image, Result(seq, time.time(), None, (16, 16)))
                tasks.append(asyncio.ensure_future(broadcaster.encoded(frame, "native")))
            await asyncio.sleep(0.2)  # the requests are in the encoder threads' hands
            release.set()
            frames = await asyncio.wait_for(asyncio.gather(*tasks), 5)
            return [frame.seq for frame in frames]
        finally:
            broadcaster.close()
            broadcaster.detach(time.monotonic() + 2.0)

    assert asyncio.run(scenario()) == [1, 4, 4, 4]  # frames 2 and 3 were never encoded
    assert hub.encodes["native"] == 2
