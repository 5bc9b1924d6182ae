"""What an adversary tried on the running dashboard (issue 16), each against a real uvicorn on
loopback with real sockets."""

from __future__ import annotations

import concurrent.futures
import random
from collections import Counter
from typing import Any

from tests.test_server import TOKEN, running_server

ACTIONS = ("start", "stop", "pause", "resume")


def test_concurrent_pipeline_actions_never_crash_or_fail_with_a_real_video() -> None:
    """Before the service lock, 20 clients pressing start/stop at once on a video source killed
    the process within one or two bursts (libavcodec's async_lock abort) or answered 500
    ("cannot join thread before it is started")."""
    rng = random.Random(16)
    statuses: Counter[int] = Counter()
    with running_server(source="demo", source_fps=0) as srv, \
            concurrent.futures.ThreadPoolExecutor(20) as pool:
        clients = [srv.client(TOKEN) for _ in range(20)]
        try:
            for _ in range(40):  # bursts
                burst = [rng.choice(ACTIONS) for _ in range(20)]
                futures = [pool.submit(c.post, f"/api/pipeline/{a}") for c, a in zip(clients, burst)]
                for future in futures:
                    statuses[future.result().status_code] += 1
            final = clients[0].post("/api/pipeline/start")
            assert final.status_code == 200 and final.json()["state"] == "running"
            srv.wait_frames(3)  # the video still decodes after it all
            assert clients[0].get("/health").status_code == 200
        finally:
            for client in clients:
                client.close()
    assert sum(statuses.values()) == 800
    assert set(statuses) <= {200, 409}, statuses  # 409: an action that does not apply now
    assert srv.thread._thread is not None


def test_a_slow_model_load_holds_neither_pause_nor_stop(tmp_path: Any) -> None:
    """Loading a model takes seconds (a file source opens with FFmpeg's timeout): the pipeline
    actions must not queue behind it; only another live change waits for it."""
    import threading

    from tests.test_server import fake_model_factory

    gate = threading.Event()
    loading = threading.Event()

    slow = tmp_path / "slow.onnx"
    slow.write_bytes(b"only its name matters: the factory below makes the model")

    def slow_factory(settings: Any) -> Any:
        if settings.model == str(slow):
            loading.set()
            assert gate.wait(30), "the test never let the load finish"
        return fake_model_factory(settings)

    with running_server(model_factory=slow_factory) as srv, srv.client(TOKEN) as client, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        srv.wait_frames(1)
        patch = pool.submit(client.patch, "/api/config", json={"model": str(slow)}, timeout=60)
        try:
            assert loading.wait(20)
            with srv.client(TOKEN) as other:
                assert other.post("/api/pipeline/pause", timeout=5.0).json()["state"] == "paused"
                assert other.post("/api/pipeline/resume", timeout=5.0).json()["state"] == "running"
        finally:
            gate.set()
        assert patch.result().status_code == 200
        assert patch.result().json()["model"] == str(slow)
