"""What an adversary tried on the running dashboard (issue 16), each against a real uvicorn on
loopback with real sockets."""

from __future__ import annotations

import concurrent.futures
import random
from collections import Counter

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
