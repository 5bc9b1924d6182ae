"""The product as a DeepLens owner runs it today: the installed ``deeplens-dashboard`` service on
the device's camera (fake ``awscam``) and model (``awscam.Model``), serving the page's stream and
results, the FIFO read by real ffmpeg, results on MQTT to a real mosquitto that wants a password,
and a clean stop on SIGTERM. Under ``.ci/run`` these run a second time with Python 3.7 against the
product installed offline from the device bundle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, List

import cv2
import httpx
import numpy as np
import pytest

from tests.conftest import FAKES, INSTALLED, free_port, product_pythonpath, require_tool
from tests.onnx_graphs import detector
from tests.test_fifo import run_reader, wait_for
from tests.test_iot import Broker, Subscriber

pytestmark = pytest.mark.device

CATS = {"Egyptian cat", "tiger cat", "tabby, tabby cat"}
THING = "cam-device"
TOPIC = "deeplens/cam-device/infer"
AVAILABILITY = "deeplens/cam-device/availability"


def dashboard_command() -> List[str]:
    """The console script installed beside this interpreter (the bundle's venv under CI)."""
    script = Path(sys.executable).with_name("deeplens-dashboard")
    if script.exists():
        return [str(script)]
    if INSTALLED:
        pytest.fail(f"no deeplens-dashboard script beside {sys.executable}")
    return [sys.executable, "-m", "app"]


def device_env(image_file: Path, **extra: str) -> dict:  # type: ignore[type-arg]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPLENS_", "FAKE_", "AWS_"))}
    env.update(PYTHONPATH=product_pythonpath(str(FAKES)), FAKE_AWSCAM_VIDEO=str(image_file), **extra)
    return env


@pytest.fixture
def processes() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen[bytes]:  # type: ignore[type-arg]
        with open(log, "wb") as out:
            proc = subprocess.Popen([*dashboard_command(), *args], cwd=cwd, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def read_parts(url: str, count: int) -> list[bytes]:
    """The first ``count`` JPEG parts of an MJPEG stream."""
    jpegs: list[bytes] = []
    with httpx.stream("GET", url, timeout=20) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("multipart/x-mixed-replace")
        buffer = b""
        for chunk in response.iter_bytes():
            buffer += chunk
            while True:
                start, end = buffer.find(b"\xff\xd8"), buffer.find(b"\xff\xd9")
                if start < 0 or end < start:
                    break
                jpegs.append(buffer[start:end + 2])
                buffer = buffer[end + 2:]
            if len(jpegs) >= count:
                return jpegs
    return jpegs


def test_the_service_on_a_device(tmp_path: Path, image_file: Path, device_xml: Path, processes: Any) -> None:
    mosquitto = require_tool("mosquitto")
    ffmpeg = require_tool("ffmpeg")
    broker = Broker(mosquitto, free_port(), tmp_path, users={"cam": "device-pw", "reader": "r"})
    broker.start()
    sub = Subscriber(broker.port, [TOPIC, AVAILABILITY], login=("reader", "r"))
    try:
        assert sub.ready.wait(20)
        port = free_port()
        fifo = tmp_path / "results.mjpeg"
        log = tmp_path / "dashboard.log"
        proc = processes(
            ["--model", str(device_xml), "--model-type", "classification", "--labels", "imagenet",
             "--host", "127.0.0.1", "--port", str(port), "--fifo", str(fifo), "--iot", "mqtt",
             "--mqtt", broker.url, "--mqtt-username", "cam", "--thing-name", THING,
             "--iot-topic", "deeplens/{thing}/infer", "--token", "device-test-token-0123"],
            device_env(image_file, DEEPLENS_MQTT_PASSWORD="device-pw"), tmp_path, log)
        url = f"http://127.0.0.1:{port}"

        def results() -> Any:
            try:
                response = httpx.get(url + "/results", timeout=5)
            except httpx.HTTPError:
                return None
            data = response.json()
            return data if data["seq"] >= 2 and not data.get("error") else None

        assert wait_for(lambda: results() is not None or proc.poll() is not None, timeout=120), \
            log.read_text()[-3000:]
        assert proc.poll() is None, log.read_text()[-3000:]
        data = results()
        assert data["model"]["backend"].startswith("awscam")  # awscam.Model, on the device's camera
        assert data["results"][0]["name"] in CATS, data["results"]
        # The page's stream.
        jpegs = read_parts(url + "/stream.mjpg", 3)
        assert len(jpegs) == 3
        for jpeg in jpegs:
            assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR) is not None
        # The project stream, as mplayer's ffmpeg reads it.
        out = tmp_path / "ff"
        out.mkdir()
        reader = run_reader([ffmpeg, "-nostdin", "-loglevel", "error", "-f", "mjpeg", "-i", str(fifo),
                             "-frames:v", "3", str(out / "out%d.jpg")])
        assert reader.returncode == 0, reader.stderr
        assert len(list(out.glob("out*.jpg"))) == 3
        # The IoT topic, through a broker that wants a password.
        assert wait_for(lambda: any(p.startswith(b"{") and set(json.loads(p)) & CATS
                                    for p in sub.on(TOPIC)), timeout=30), sub.on(TOPIC)[-5:]
        assert wait_for(lambda: sub.on(AVAILABILITY)[-1:] == [b"online"])
        # systemd stops the service with SIGTERM.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()[-3000:]
        assert wait_for(lambda: sub.on(AVAILABILITY)[-1:] == [b"offline"])
        text = log.read_text()
        assert "device-pw" not in text and "Traceback" not in text, text[-3000:]
    finally:
        sub.stop()
        broker.kill()


def test_an_ssd_model_through_awscam(tmp_path: Path, image_file: Path, processes: Any) -> None:
    graph = tmp_path / "ssd.onnx"
    graph.write_bytes(detector([[0, 1, 0.9, 0.1, 0.2, 0.5, 0.6], [0, 2, 0.1, 0.5, 0.5, 0.6, 0.6]]))
    xml = tmp_path / "mxnet_ssd_FP16_FUSED.xml"
    xml.write_text(f'<net name="ssd" onnx="{graph}" output="detection_out"/>\n')
    log = tmp_path / "infer.log"
    out = tmp_path / "infer.jsonl"
    with open(out, "wb") as stdout, open(log, "wb") as stderr:
        proc = subprocess.run(
            [*dashboard_command(), "infer", "--frames", "2", "--model", str(xml), "--model-type", "ssd",
             "--labels", "voc", "--input-size", "300x300"],
            cwd=tmp_path, env=device_env(image_file), stdout=stdout, stderr=stderr, timeout=120)
    assert proc.returncode == 0, log.read_text()[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2
    result = lines[-1]["result"]
    assert result["model"]["type"] == "ssd" and result["model"]["backend"].startswith("awscam")
    # The 0.1 row is under the detectors' default threshold (0.25); the box is in frame pixels.
    assert [r["name"] for r in result["results"]] == ["aeroplane"]
    h, w = cv2.imread(str(image_file)).shape[:2]
    box = result["results"][0]["box"]
    assert [box[k] for k in ("xmin", "ymin", "xmax", "ymax")] == pytest.approx(
        [0.1 * w, 0.2 * h, 0.5 * w, 0.6 * h], abs=2)
    assert lines[-1]["payload"] == {"aeroplane": pytest.approx(0.9)}
