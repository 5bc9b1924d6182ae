"""``lambda_main`` as Greengrass runs it: imported in a fresh process with the fake ``awscam``,
``mo`` and ``greengrasssdk`` on the path. The import serves the dashboard, the FIFO and the IoT
topic and returns; ``lambda_handler`` returns None; a start failure is published, not fatal."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FAKES, free_port, product_pythonpath
from tests.test_fifo import decode, read_fifo, wait_for

pytestmark = pytest.mark.device

THING = "deeplens_test_thing"
TOPIC = f"$aws/things/{THING}/infer"

# Greengrass imports the module, calls the handler per event and keeps its own main thread;
# "ended" lets the main thread finish, so only the server's non-daemon thread keeps us alive.
SCRIPT = """
import sys, time
import lambda_main
print("handler", repr(lambda_main.lambda_handler({}, None)), flush=True)
import awscam
print("cv2_before_awscam", awscam.CV2_IMPORTED_BEFORE_AWSCAM, flush=True)
if sys.argv[1] == "busy":
    for _ in range(1200):  # a main loop of its own, as the Greengrass runtime has (bounded)
        time.sleep(0.1)
"""


@dataclass
class LambdaProcess:
    proc: subprocess.Popen[bytes]
    port: int
    fifo: Path
    messages_file: Path
    out: Path
    err: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def messages(self) -> list[tuple[str, bytes]]:
        if not self.messages_file.exists():
            return []
        out = []
        for line in self.messages_file.read_text().splitlines():
            entry = json.loads(line)
            out.append((entry["topic"], base64.b64decode(entry["payload_b64"])))
        return out

    def get(self, path: str) -> Any:
        response = httpx.get(self.url + path, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_started(self) -> None:
        # Wait for the script's last line, newline included: a flush by another thread can land
        # between print's writes, so a bare "handler" may be on disk before " None" is.
        ok = wait_for(lambda: re.search(r"^cv2_before_awscam \S+\n", self.stdout(), re.M) is not None
                      or self.proc.poll() is not None, timeout=120)
        assert ok and self.proc.poll() is None, self.stderr()[-4000:]


@pytest.fixture
def lambda_env(tmp_path: Path, image_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPLENS_", "FAKE_", "AWS_"))}
    env.update(
        PYTHONPATH=product_pythonpath(str(FAKES)),
        FAKE_AWSCAM_VIDEO=str(image_file),
        FAKE_GREENGRASS_LOG=str(tmp_path / "greengrass.jsonl"),
        FAKE_MO_ARTIFACTS=str(tmp_path),
        # What a Greengrass core gives its Lambdas: the SDK's client works.
        AWS_CONTAINER_AUTHORIZATION_TOKEN="test-token",
        MY_FUNCTION_ARN="arn:aws:lambda:us-east-1:123456789012:function:deeplens-dashboard:1",
        AWS_IOT_THING_NAME=THING,
        DEEPLENS_HOST="127.0.0.1",
        DEEPLENS_PORT=str(free_port()),
        DEEPLENS_FIFO=str(tmp_path / "results.mjpeg"),
        DEEPLENS_MODEL_TYPE="classification",
        DEEPLENS_LABELS="imagenet",
        DEEPLENS_TOKEN="control-token-0123456789",
    )
    return env


@pytest.fixture
def start_lambda(tmp_path: Path) -> Iterator[Callable[..., LambdaProcess]]:
    started: list[LambdaProcess] = []

    def start(env: dict[str, str], mode: str = "ended") -> LambdaProcess:
        out, err = tmp_path / f"out{len(started)}.txt", tmp_path / f"err{len(started)}.txt"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], cwd=tmp_path, env=env,
                                    stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
        lp = LambdaProcess(proc, int(env["DEEPLENS_PORT"]), Path(env["DEEPLENS_FIFO"]),
                           Path(env["FAKE_GREENGRASS_LOG"]), out, err)
        started.append(lp)
        return lp

    try:
        yield start
    finally:
        for lp in started:
            if lp.proc.poll() is None:
                lp.proc.send_signal(signal.SIGTERM)
                try:
                    lp.proc.wait(10)
                except subprocess.TimeoutExpired:
                    lp.proc.kill()
                    lp.proc.wait(10)


CATS = {"Egyptian cat", "tiger cat", "tabby, tabby cat"}


def test_import_serves_dashboard_fifo_and_topic(lambda_env: dict[str, str], device_xml: Path,
                                                start_lambda: Any) -> None:
    lp = start_lambda(dict(lambda_env, DEEPLENS_MODEL=str(device_xml)))
    lp.wait_started()
    assert "handler None" in lp.stdout()
    assert "cv2_before_awscam False" in lp.stdout()  # lambda_main imports awscam before cv2

    # The dashboard answers with the device model's results on the camera's frames.
    assert wait_for(lambda: lp.get("/results")["seq"] > 0, timeout=30)
    results = lp.get("/results")
    assert results["model"]["backend"].startswith("awscam")
    assert {r["name"] for r in results["results"]} & CATS
    assert lp.get("/health")["status"] == "ok"

    # The project stream.
    frames, _ = read_fifo(lp.fifo, 3, timeout=30)
    assert len(frames) == 3
    for jpeg in frames:
        # the fake camera shows chelsea (451x300), below 480p: written at its own size
        assert decode(jpeg).shape == (300, 451, 3)

    # The IoT topic, through the Greengrass SDK: the seed's status lines, then {label: prob}.
    assert wait_for(lambda: len(lp.messages()) >= 5, timeout=30)
    messages = lp.messages()
    assert {topic for topic, _ in messages} == {TOPIC}
    texts = [payload for _, payload in messages]
    assert texts[0] == b"Loading mxnet_efficientnet_FP16_FUSED model"
    assert texts[1] == b"mxnet_efficientnet_FP16_FUSED model loaded"
    payload = json.loads(texts[2])
    assert len(payload) == 5 and set(payload) & CATS
    assert all(isinstance(v, float) for v in payload.values())

    # The main thread has finished; the server's thread keeps the function alive. SIGTERM ends
    # it cleanly.
    assert lp.proc.poll() is None
    lp.proc.send_signal(signal.SIGTERM)
    assert lp.proc.wait(10) == 0, lp.stderr()[-4000:]
    assert "deeplens-dashboard Lambda stopped" in lp.stderr()


@pytest.mark.parametrize("model,expected", [
    ("missing.xml", "optimized model file not found"),
    ("my_mxnet_model", "mo.optimize failed for artifact 'my_mxnet_model': error 2"),
])
def test_start_failure_is_published_and_shown(lambda_env: dict[str, str], tmp_path: Path,
                                              start_lambda: Any, model: str, expected: str) -> None:
    model_arg = str(tmp_path / model) if model.endswith(".xml") else model
    lp = start_lambda(dict(lambda_env, DEEPLENS_MODEL=model_arg))
    lp.wait_started()
    assert "handler None" in lp.stdout()

    def errors() -> list[bytes]:
        return [p for _, p in lp.messages() if p.startswith(b"Error in deeplens-dashboard: ")]

    assert wait_for(lambda: len(errors()) >= 1, timeout=30)
    assert expected.encode() in errors()[0]
    assert b"model not loaded" in errors()[0]
    # The dashboard is up and says what is wrong; frames still flow (showing the error).
    health = lp.get("/health")
    assert health["status"] == "degraded"
    assert any("model: not loaded" in r and expected in r for r in health["reasons"])
    assert wait_for(lambda: lp.get("/results")["seq"] > 3, timeout=30)
    assert expected in lp.get("/results")["error"]
    assert expected in lp.stderr()  # and logged
    # Every frame carries the error, yet it went out once, not once per frame.
    assert len(errors()) == 1
    assert not [p for _, p in lp.messages() if p.startswith(b"{")]
    assert lp.proc.poll() is None


def test_sigterm_with_the_main_thread_still_busy(lambda_env: dict[str, str], device_xml: Path,
                                                 start_lambda: Any) -> None:
    """Under Greengrass the runtime's own loop holds the main thread: SIGTERM still ends it."""
    lp = start_lambda(dict(lambda_env, DEEPLENS_MODEL=str(device_xml)), mode="busy")
    lp.wait_started()
    assert wait_for(lambda: lp.get("/results")["seq"] > 0, timeout=30)
    snapshot = httpx.get(lp.url + "/snapshot.jpg", timeout=10)
    assert snapshot.status_code == 200 and decode(snapshot.content).ndim == 3
    lp.proc.send_signal(signal.SIGTERM)
    assert lp.proc.wait(10) == 0, lp.stderr()[-4000:]
    assert "deeplens-dashboard Lambda stopped" in lp.stderr()


def test_bad_setting_is_published_and_the_default_used(lambda_env: dict[str, str],
                                                       device_xml: Path, start_lambda: Any,
                                                       tmp_path: Path) -> None:
    """No CLI to exit 2 from: a bad DEEPLENS_ variable is logged and published, not fatal (the
    DEEPLENS_CONFIG file's value stands); a FIFO path that is a regular file is left alone and
    the stream is turned off."""
    taken = tmp_path / "taken.mjpeg"
    taken.write_bytes(b"not ours")
    config = tmp_path / "lambda.toml"
    config.write_text("top-k = 3\n")
    env = dict(lambda_env, DEEPLENS_MODEL=str(device_xml), DEEPLENS_TOP_K="many",
               DEEPLENS_FIFO=str(taken), DEEPLENS_CONFIG=str(config))
    lp = start_lambda(env)
    lp.wait_started()
    assert wait_for(lambda: len([p for _, p in lp.messages() if p.startswith(b"Error")]) >= 2,
                    timeout=30)
    errors = [p.decode() for _, p in lp.messages() if p.startswith(b"Error")]
    assert any("--top-k (from DEEPLENS_TOP_K)" in e for e in errors)
    assert any("--fifo" in e and str(taken) in e for e in errors)
    assert wait_for(lambda: lp.get("/results")["seq"] > 0, timeout=30)
    assert lp.get("/results")["top_k"] == 3  # the bad variable dropped, the file's value kept
    assert taken.read_bytes() == b"not ours"
    # Running on a fallback is a fault to see, not only to find in the log.
    health = lp.get("/health")
    assert health["status"] == "degraded", health
    reasons = " | ".join(health["reasons"])
    assert "settings: --top-k (from DEEPLENS_TOP_K)" in reasons and "using the default" in reasons
    assert "settings: --fifo" in reasons and str(taken) in reasons and "turned off" in reasons


def test_snapshot_after_the_main_thread_ended(lambda_env: dict[str, str], device_xml: Path,
                                              start_lambda: Any) -> None:
    lp = start_lambda(dict(lambda_env, DEEPLENS_MODEL=str(device_xml)))
    lp.wait_started()
    assert wait_for(lambda: lp.get("/results")["seq"] > 0, timeout=30)
    assert httpx.get(lp.url + "/snapshot.jpg", timeout=10).status_code == 200
