"""The dashboard server: lifecycle, /results, /health, /api/stats, /metrics, the CLI's exits.

Every test runs a real uvicorn on a free loopback port (``running_server``) with the synthetic
source and a fake model that answers instantly, so the HTTP layer is what is under test. The
helpers here are shared by test_stream, test_control and test_page (and others).

``create_app(service)`` neither starts nor stops the service: ``serve_runtime`` starts it
before the server and stops it after the server, as the CLI and the Lambda do.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.main import create_app
from app.server import PortInUseError, ServerThread, bind_socket, create_server
from inference.models import parse
from inference.models.parse import CutsAfterParsing
from inference.outputs.iot import IotOutput, NullPublisher
from inference.service import Service
from inference.settings import Settings
from inference.types import FrameSource, Image, ModelError, ModelInfo, RawOutputs
from tests.conftest import ROOT, free_port, require_tool

TOKEN = "test-token-0123456789"
PROBS = (0.5, 0.2, 0.15, 0.1, 0.05)
LABELS = {i: f"class{i}" for i in range(len(PROBS))}
# ImageNet has names like this one: the page must cut them, not overflow.
LABELS[1] = "gas pump, gasoline pump, petrol pump, island dispenser, fuel station pump"
BROKEN = "broken.onnx"


class FakeModel(CutsAfterParsing):
    """A classification model with fixed probabilities: instant, and easy to threshold."""

    def __init__(self, name: str = "fake") -> None:
        self.info = ModelInfo(name or "fake", "classification", 8, 8, "fake", LABELS)

    def preprocess(self, frame: Image) -> Any:
        return frame

    def infer(self, inputs: Any) -> RawOutputs:
        return {"out": np.array(PROBS, np.float32)}

    def parse(self, raw: RawOutputs) -> dict[str, Any]:
        return parse.classification(raw["out"])

    def close(self) -> None:
        pass


def fake_model_factory(settings: Settings) -> FakeModel:
    if settings.model.endswith(BROKEN):
        raise ModelError(f"cannot load {settings.model}: not an ONNX graph")
    return FakeModel(settings.model)


class DeadSource:
    """A camera that never gives a frame."""

    name = "dead-camera"

    def open(self) -> None:
        pass

    def read(self) -> Image | None:
        return None

    def ready(self) -> bool:
        return False

    def close(self) -> None:
        pass


@dataclass
class FakeOutput:
    name: str = "fake-iot"
    healthy: bool = True
    messages: list[dict[str, Any]] = field(default_factory=list)
    started: bool = False

    def start(self) -> None:
        self.started = True

    def stop(self, deadline: float) -> bool:
        self.started = False
        return True

    def health(self) -> tuple[bool, str]:
        return (True, "ok") if self.healthy else (False, "broker unreachable")

    def stats(self) -> dict[str, Any]:
        return {"sent": len(self.messages)}

    def apply(self, settings: Settings) -> None:
        pass

    def recent_messages(self) -> list[dict[str, Any]]:
        return list(self.messages)


@dataclass
class Running:
    url: str
    service: Service
    thread: ServerThread
    settings: Settings

    @property
    def runtime(self) -> Service:
        """The service (its name before the redesign)."""
        return self.service

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10.0, **kwargs)

    def wait_frames(self, count: int = 1, timeout: float = 20.0) -> int:
        """Wait until ``count`` more frames are published; the new seq (fails if none come)."""
        hub = self.service.hub
        seq = hub.seq
        target = seq + count
        deadline = time.monotonic() + timeout
        while seq < target:
            frame = hub.wait_newer(seq, max(0.0, deadline - time.monotonic()))
            assert frame is not None, f"no new frame after seq {seq}"
            seq = frame.seq
        return seq


def server_settings(source: str = "synthetic:640x360@30", **overrides: Any) -> Settings:
    """The settings ``running_server`` serves with: a free loopback port, TOKEN, no outputs."""
    values: dict[str, Any] = {"source": source, "host": "127.0.0.1", "port": free_port(),
                              "token": TOKEN, "fifo": "off", "iot": "off", "log_level": "warning"}
    values.update(overrides)
    return Settings(**values)


@contextmanager
def running_server(
    source: str = "synthetic:640x360@30",
    source_factory: Callable[[Settings], FrameSource] | None = None,
    model_factory: Callable[[Settings], Any] = fake_model_factory,
    outputs: tuple[Any, ...] = (),
    **overrides: Any,
) -> Iterator[Running]:
    settings = server_settings(source, **overrides)
    kwargs: dict[str, Any] = {"model_factory": model_factory}
    if source_factory is not None:
        kwargs["source_factory"] = source_factory
    service = Service(settings, **kwargs)
    for output in outputs:
        service.add_output(output)
    with serve_runtime(service) as running:
        yield running


@contextmanager
def serve_runtime(service: Service, settings: Settings | None = None) -> Iterator[Running]:
    """A real uvicorn on the service's loopback port serving ``service``, which is started
    before the server and stopped after it; both stopped on exit. ``settings``, if given, must
    be the service's own (the server takes its options from ``service.settings``)."""
    if settings is not None and settings != service.settings:
        raise ValueError("serve_runtime serves with service.settings; give the service those")
    service.start()
    try:
        thread = ServerThread(create_server(service))
        thread.start()
    except BaseException:
        service.stop()
        raise
    try:
        yield Running(thread.url, service, thread, service.settings)
    finally:
        thread.stop(time.monotonic() + 2.0)
        service.stop()
        assert thread._thread is not None and not thread._thread.is_alive()


serve_service = serve_runtime


# -- multipart parsing, shared with the stream tests ----------------------------------------------
@dataclass
class Part:
    headers: dict[str, str]
    body: bytes

    @property
    def seq(self) -> int:
        return int(self.headers["x-frame-seq"])


class PartReader:
    """Parses ``multipart/x-mixed-replace; boundary=frame`` from a byte iterator, strictly."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = bytearray()

    def _fill(self, size: int) -> None:
        while len(self._buf) < size:
            self._buf += next(self._chunks)

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            self._buf += next(self._chunks)
        line, _, rest = bytes(self._buf).partition(b"\r\n")
        self._buf = bytearray(rest)
        return line

    def next(self) -> Part:
        boundary = self._line()
        assert boundary == b"--frame", f"expected the boundary, got {boundary[:60]!r}"
        headers: dict[str, str] = {}
        line = self._line()
        while line:
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
            line = self._line()
        size = int(headers["content-length"])
        self._fill(size + 2)
        body, tail = bytes(self._buf[:size]), bytes(self._buf[size:size + 2])
        del self._buf[:size + 2]
        assert tail == b"\r\n", "a part must end with CRLF after Content-Length bytes"
        return Part(headers, body)


def read_parts(client: httpx.Client, path: str, count: int) -> list[Part]:
    with client.stream("GET", path) as response:
        assert response.status_code == 200, response.read()
        reader = PartReader(response.iter_bytes())
        return [reader.next() for _ in range(count)]


# -- tests -----------------------------------------------------------------------------------------
def test_the_app_token_is_the_given_one_else_the_setting_else_generated() -> None:
    service = Service(Settings())
    generated = create_app(service).state.token
    assert len(generated) >= 24
    assert create_app(service).state.token != generated, "each app generates its own"
    assert create_app(service, token=generated).state.token == generated
    mine = Service(Settings(token="mine-0123456789abcdef"))
    assert create_app(mine).state.token == "mine-0123456789abcdef"
    assert create_app(mine, token="given").state.token == "given"
    # The server's app is where the CLI and the Lambda read the token they log.
    assert create_server(mine).app.state.token == "mine-0123456789abcdef"
    assert len(create_server(service).app.state.token) >= 24


def test_server_thread_is_named_non_daemon_and_stops_the_loop() -> None:
    with running_server() as srv:
        thread = srv.thread._thread
        assert thread is not None and thread.name == "http-server" and not thread.daemon
        assert srv.thread.started
        assert srv.service.loop.state.value == "running"
        srv.wait_frames(2)
    assert not thread.is_alive()
    assert srv.service.loop.state.value == "stopped"
    assert not srv.thread.started


def test_results_is_pretty_json_with_payload_and_state() -> None:
    with running_server() as srv, srv.client() as client:
        srv.wait_frames(1)
        response = client.get("/results")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        text = response.text
        assert text.endswith("\n") and '\n  "seq": ' in text  # indented for curl
        data = response.json()
        assert data["seq"] >= 1 and data["state"] == "running"
        assert data["model"]["name"] == "fake" and data["model"]["type"] == "classification"
        assert [r["name"] for r in data["results"]] == [LABELS[i] for i in range(5)]
        assert data["payload"] == pytest.approx({r["name"]: r["prob"] for r in data["results"]}, abs=1e-6)
        assert set(data["timings_ms"]) >= {"capture", "preprocess", "inference", "postprocess"}
        assert abs(data["timestamp"] - time.time()) < 600


def test_a_users_stop_or_pause_is_state_not_a_fault_in_health() -> None:
    with running_server() as srv, srv.client(TOKEN) as client:
        srv.wait_frames(1)
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["reasons"] == []
        assert health["state"] == "running"
        for action, state in (("pause", "paused"), ("stop", "stopped")):
            assert client.post(f"/api/pipeline/{action}").json()["state"] == state
            health = client.get("/health").json()
            # Stop and Pause are what the user asked for: shown, not a reason to alert.
            assert health["status"] == "ok" and health["reasons"] == [], health
            assert health["state"] == state
            assert health["checks"]["pipeline"]["state"] == state


def test_health_names_camera_model_and_outputs() -> None:
    def broken_model(settings: Settings) -> FakeModel:
        raise ModelError("weights file is truncated")

    bad_output = FakeOutput(healthy=False)
    with running_server(source_factory=lambda s: DeadSource(), model_factory=broken_model,
                        outputs=(bad_output,)) as srv, srv.client() as client:
        srv.wait_frames(1)  # the NO SIGNAL frame
        health = client.get("/health").json()
        assert health["status"] == "degraded"
        reasons = " | ".join(health["reasons"])
        assert "camera: no frame from dead-camera" in reasons
        assert "model: not loaded: weights file is truncated" in reasons
        assert "outputs: fake-iot: broker unreachable" in reasons
        assert health["checks"]["outputs"]["fake-iot"] == {"ok": False, "message": "broker unreachable"}
        assert bad_output.started


def test_stats_metrics_docs_and_iot_messages() -> None:
    output = FakeOutput(messages=[{"time": 1.0, "topic": "$aws/things/x/infer", "payload": "{}"}])
    settings = server_settings()
    service = Service(settings, model_factory=fake_model_factory)
    # /api/iot/messages shows the service's IoT output (service.iot): a real one, publishing nowhere.
    iot = IotOutput(settings, service.hub, NullPublisher(), thing="x")
    service.add_output(output)
    service.add_output(iot)
    with serve_runtime(service) as srv, srv.client(TOKEN) as client:
        srv.wait_frames(2)
        stats = client.get("/api/stats").json()
        for key in ("capture_fps", "inference_fps", "delivered_fps", "frames_skipped", "viewers"):
            assert key in stats
        assert stats["jpeg"]["encodes_total"] == 0 and stats["viewers"] == []
        # the loop's OS thread id names a thread of this process (what top -H / py-spy show)
        assert os.path.isdir(f"/proc/{os.getpid()}/task/{stats['loop_thread_id']}")
        assert set(stats["outputs"]) == {"fake-iot", iot.name}
        assert stats["outputs"]["fake-iot"] == {"sent": 1}
        assert stats["outputs"][iot.name]["topic"] == "$aws/things/x/infer"
        metrics = client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        assert re.search(r"^deeplens_frames_total \d+", metrics.text, re.M)
        assert 'deeplens_pipeline_state{state="running"} 1.0' in metrics.text
        assert 'deeplens_output_healthy{output="fake-iot"} 1.0' in metrics.text
        assert f'deeplens_output_healthy{{output="{iot.name}"}} 1.0' in metrics.text
        # Paused and drained, the IoT output's messages hold still to be compared.
        assert client.post("/api/pipeline/pause").json()["state"] == "paused"
        sent = -1
        for _ in range(50):
            if sent == iot.sent:
                break
            sent = iot.sent
            time.sleep(0.3)
        messages = client.get("/api/iot/messages").json()
        assert messages == iot.recent_messages() and len(messages) >= 2
        assert {m["topic"] for m in messages} == {"$aws/things/x/infer"}
        assert client.get("/docs").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        for path in ("/stream.mjpg", "/snapshot.jpg", "/results", "/results/events", "/api/config",
                     "/api/pipeline/{action}", "/health", "/api/stats", "/metrics"):
            assert path in paths


def test_two_apps_in_one_process_have_their_own_metrics() -> None:
    with running_server() as a, running_server() as b, a.client() as ca, b.client() as cb:
        a.wait_frames(1)
        b.wait_frames(1)
        assert "deeplens_frames_total" in ca.get("/metrics").text
        assert "deeplens_frames_total" in cb.get("/metrics").text


def test_iot_messages_empty_without_an_iot_output() -> None:
    with running_server() as srv, srv.client() as client:
        assert client.get("/api/iot/messages").json() == []


def test_bind_socket_names_the_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} .* already in use.*--port"):
            bind_socket("127.0.0.1", port)


def _cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "app", *args], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def test_cli_port_in_use_exits_1_with_a_clear_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _cli("--host", "127.0.0.1", "--port", str(port), "--source", "synthetic")
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill() if proc.poll() is None else None
    assert proc.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in err and "--port" in err
    assert "Traceback" not in err


def test_cli_serves_logs_the_control_url_once_and_stops_on_sigterm_with_open_streams() -> None:
    port = free_port()
    proc = _cli("--host", "127.0.0.1", "--port", str(port), "--source", "synthetic:320x180@30",
                "--model", "catdog", "--fifo", "off", "--iot", "off")
    lines: list[str] = []
    token_line = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "?token=" in line:
                token_line.set()

    reader = threading.Thread(target=drain, name="cli-stderr", daemon=True)
    reader.start()
    try:
        assert token_line.wait(90), "".join(lines)
        token = re.search(r"\?token=(\S+)", "".join(lines))
        assert token is not None
        url = f"http://127.0.0.1:{port}"
        ended: list[str] = []

        def watch(path: str) -> None:
            with httpx.Client(base_url=url, timeout=10) as client, client.stream("GET", path) as r:
                for _ in r.iter_bytes():
                    pass
            ended.append(path)

        watchers = [threading.Thread(target=watch, args=(p,), name=f"watch{i}")
                    for i, p in enumerate(("/stream.mjpg", "/stream.mjpg?res=480p", "/results/events"))]
        for w in watchers:
            w.start()
        with httpx.Client(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                stats = client.get("/api/stats").json()
                # The server logs its URL before the loop's first result: wait for both.
                if (len(stats["viewers"]) == 2 and stats["event_subscribers"] == 1
                        and stats["seq"] >= 1):
                    break
                time.sleep(0.05)
            assert client.get("/results").json()["seq"] >= 1
        proc.send_signal(signal.SIGTERM)
        # The contract: open streams end and the process exits within 2 s of the signal.
        assert proc.wait(timeout=2.0) == 0
        for w in watchers:
            w.join(2.0)
        assert sorted(ended) == sorted(["/stream.mjpg", "/stream.mjpg?res=480p", "/results/events"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
    log = "".join(lines)
    assert log.count(token.group(1)) == 1, "the token is logged exactly once"
    assert f"http://127.0.0.1:{port}/" in log
    assert "Traceback" not in log


def test_tls_serves_https_and_marks_the_cookie_secure(tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
         str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    with running_server(ssl_certfile=str(cert), ssl_keyfile=str(key)) as srv:
        assert srv.url.startswith("https://")
        with httpx.Client(base_url=srv.url, verify=False, timeout=10) as client:
            assert client.get("/health").json()["status"] == "ok"
            opened = client.get("/", params={"token": TOKEN})
            assert opened.status_code == 303 and "Secure" in opened.headers["set-cookie"]
        with httpx.Client(base_url=srv.url.replace("https", "http"), timeout=10) as plain:
            with pytest.raises(httpx.HTTPError):
                plain.get("/health")


STREAMS = {"/stream.mjpg", "/results/events"}


def test_head_is_answered_on_every_get_endpoint_that_is_not_a_stream() -> None:
    """Uptime monitors use HEAD: 200, the GET's headers, no body (streams excepted)."""
    from starlette.routing import Route

    def walk(routes: list[Any]) -> Iterator[Route]:
        for route in routes:
            if isinstance(route, Route):
                yield route
            yield from walk(getattr(getattr(route, "original_router", None), "routes", []))

    with running_server() as srv, srv.client() as client:
        srv.wait_frames(1)
        app = srv.thread.server.app
        paths = sorted(r.path for r in walk(app.routes)
                       if "GET" in (r.methods or ()) and r.path not in STREAMS and "{" not in r.path)
        assert {"/", "/health", "/snapshot.jpg", "/results", "/metrics", "/api/stats",
                "/api/config", "/api/iot/messages", "/docs", "/openapi.json"} <= set(paths)
        for path in paths + ["/static/" + os.listdir(ROOT / "app" / "static")[0]]:
            get = client.get(path)
            head = client.head(path)
            expected = 307 if path == "/redoc" else 200  # to /docs
            assert (head.status_code, get.status_code) == (expected, expected), (path, head.status_code)
            assert head.content == b"", path
            assert head.headers.get("content-type") == get.headers.get("content-type"), path
            assert set(head.headers) == set(get.headers), path
            if path in ("/openapi.json", "/docs", "/api/config"):  # a stable body
                assert head.headers["content-length"] == get.headers["content-length"], path
        # A stream still answers GET only; a POST-only route still says 405 to HEAD.
        assert client.head("/api/pipeline/stop").status_code == 405


def test_metrics_has_process_iot_fifo_and_model_info(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from inference.outputs.fifo import FifoWriter

    settings = server_settings(iot_max_rate=0)
    service = Service(settings, model_factory=fake_model_factory)
    iot = IotOutput(settings, service.hub, NullPublisher(), thing="x")
    fifo = FifoWriter(str(tmp_path / "results.mjpeg"), service.hub)
    service.add_output(iot)
    service.add_output(fifo)
    with serve_runtime(service) as srv, srv.client() as client:
        srv.wait_frames(3)
        deadline = time.monotonic() + 20
        while iot.sent < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}

    def value(name: str, **labels: str) -> float:
        family = families[name]
        for sample in family.samples:
            if sample.labels == labels and sample.name in (name, name + "_total"):
                return float(sample.value)
        raise AssertionError(f"no {name}{labels} in {family.samples}")

    assert value("process_cpu_seconds") > 0
    assert value("process_resident_memory_bytes") > 10e6
    assert value("deeplens_iot_messages_sent") >= 2
    assert value("deeplens_iot_messages_dropped", reason="queue") == 0
    assert value("deeplens_iot_messages_dropped", reason="backlog") == 0
    assert value("deeplens_iot_messages_skipped", reason="rate") == 0
    assert value("deeplens_iot_backlog") == 0
    assert value("deeplens_iot_publish_errors") == 0
    assert value("deeplens_fifo_frames_written") == 0  # no reader
    assert value("deeplens_fifo_frames_dropped") == 0
    assert value("deeplens_fifo_bytes_written") == 0
    assert value("deeplens_fifo_reader_connected") == 0
    assert value("deeplens_fifo_readers") == 0
    info = families["deeplens_model_info"].samples[0]
    assert info.name == "deeplens_model_info" and info.value == 1.0
    assert info.labels["name"] == "fake" and info.labels["type"] == "classification"
    assert info.labels["backend"] == "fake"
