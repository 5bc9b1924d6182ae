"""The IoT output: the seed's payload on ``$aws/things/<thing>/infer`` through a real mosquitto
broker, the fake Greengrass SDK and the log; drops, errors and limits counted, never blocking."""

from __future__ import annotations

import json
import logging
import os
import pwd
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from inference.outputs import OutputError, build_outputs
from inference.outputs.iot import (
    IN_FLIGHT,
    MAX_MESSAGE_BYTES,
    QUEUE_SIZE,
    GreengrassPublisher,
    IotOutput,
    LogPublisher,
    MqttPublisher,
    PublishOffline,
    availability_topic,
    infer_topic,
    make_publisher,
    resolve_thing_name,
)
from inference.pipeline.frames import FrameHub
from inference.result import Item, Result
from inference.service import Service
from inference.settings import ConfigError, Settings
from inference.sources.synthetic import SyntheticSource
from inference.types import ModelInfo
from tests.conftest import free_port, product_pythonpath, require_tool
from tests.test_fifo import _StubModel, stop, wait_for

STUB = ModelInfo("stub", "classification", 8, 8, "test", {0: "dog", 1: "cat"})
IMAGE = np.zeros((48, 64, 3), np.uint8)


def result(seq: int, items: tuple[Item, ...] | None = None, error: str | None = None,
           model: ModelInfo | None = STUB) -> Result:
    if items is None:
        items = (Item(1, "cat", 0.75), Item(0, "dog", 0.25))
    return Result(seq, 1700000000.0 + seq, model, (64, 48), items=items, error=error, top_k=2)


# -- a publisher that records (and can block or fail) ----------------------------------------------
class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.fail = False
        self.block = threading.Event()  # set = publish may proceed
        self.block.set()
        self.entered = threading.Event()
        self.lock = threading.Lock()

    def start(self) -> None:
        pass

    def wait_ready(self, timeout: float) -> bool:
        return True

    def publish(self, topic: str, payload: bytes) -> None:
        self.entered.set()
        if not self.block.wait(30):
            raise TimeoutError("test never released the publisher")
        if self.fail:
            raise ConnectionError("link down")
        with self.lock:
            self.messages.append((topic, payload))

    def status(self) -> tuple[bool, str]:
        return True, "recording"

    def close(self, deadline: float) -> None:
        self.block.set()

    def payloads(self) -> list[bytes]:
        """The results (JSON objects), not the status lines."""
        with self.lock:
            return [p for _, p in self.messages if p.startswith(b"{")]

    def texts(self) -> list[str]:
        with self.lock:
            return [p.decode() for _, p in self.messages if not p.startswith(b"{")]


@pytest.fixture
def hub() -> FrameHub:
    return FrameHub()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_output(hub: FrameHub) -> Iterator[Callable[..., IotOutput]]:
    made: list[IotOutput] = []

    def make(publisher: Any, **settings: Any) -> IotOutput:
        # iot_max_rate 0: the seed's one message per inference, which these tests count
        kw: dict[str, Any] = {"thing_name": "cam1", "model": "stub", "iot_max_rate": 0}
        kw.update(settings)
        clock = kw.pop("clock", time.monotonic)
        out = IotOutput(Settings(**kw), hub, publisher, clock=clock)
        made.append(out)
        out.start()
        return out

    yield make
    for out in made:
        stop(out)


def drained(out: IotOutput) -> bool:
    stats = out.stats()
    return stats["queue"] == 0


# -- payloads and filters ----------------------------------------------------------------------
def test_seed_payload_one_message_per_inference(make_output: Any, recorder: Recorder,
                                                hub: FrameHub) -> None:
    out = make_output(recorder)
    for seq in range(1, 11):
        hub.publish(IMAGE, result(seq))
    assert wait_for(lambda: len(recorder.payloads()) == 10)
    expected = json.dumps(result(1).payload()).encode()
    assert expected == b'{"cat": 0.75, "dog": 0.25}'
    assert recorder.payloads() == [expected] * 10
    assert {topic for topic, _ in recorder.messages} == {"$aws/things/cam1/infer"}
    # The seed's status lines, before the first result.
    assert recorder.texts() == ["Loading stub model", "stub model loaded"]
    assert out.stats()["sent"] == 12


def test_ssd_payload_keeps_the_detections_above_threshold(make_output: Any, recorder: Recorder,
                                                           hub: FrameHub) -> None:
    make_output(recorder)
    boxes = (Item(15, "person", 0.9, (1, 2, 3, 4), (0.1, 0.2, 0.3, 0.4)),
             Item(15, "person", 0.6, (5, 6, 7, 8), (0.5, 0.6, 0.7, 0.8)),
             Item(12, "dog", 0.3, (1, 1, 2, 2), (0.1, 0.1, 0.2, 0.2)))
    hub.publish(IMAGE, result(1, boxes))
    assert wait_for(lambda: len(recorder.payloads()) == 1)
    assert json.loads(recorder.payloads()[0]) == {"person": 0.9, "dog": 0.3}


def test_rich_payload_is_the_full_result(make_output: Any, recorder: Recorder, hub: FrameHub) -> None:
    make_output(recorder, iot_payload="rich")
    r = result(7, (Item(15, "person", 0.9, (1, 2, 3, 4), (0.1, 0.2, 0.3, 0.4)),))
    hub.publish(IMAGE, r)
    assert wait_for(lambda: len(recorder.payloads()) == 1)
    body = json.loads(recorder.payloads()[0])
    assert body == json.loads(json.dumps(r.to_json()))
    assert body["seq"] == 7 and body["model"]["name"] == "stub"
    assert body["results"][0]["box"] == {"xmin": 1, "ymin": 2, "xmax": 3, "ymax": 4}


class Clock:
    """The output's clock, moved by the test: the rate limit without timing."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def publish_at(out: IotOutput, hub: FrameHub, clock: Clock, at: float, r: Result) -> None:
    """``r`` published at ``at`` on the output's clock, and made into messages at that time."""
    clock.now = 1000.0 + at
    hub.publish(IMAGE, r)
    assert wait_for(lambda: drained(out) and out.stats()["composed"] >= r.seq), out.stats()


def test_rate_limit_sends_the_newest_within_the_interval(make_output: Any, recorder: Recorder,
                                                         hub: FrameHub) -> None:
    clock = Clock()
    out = make_output(recorder, iot_max_rate=1.0, iot_payload="rich", clock=clock)
    for seq in range(1, 11):  # 0.0 .. 0.9 s: the first goes out, the rest wait for the next second
        publish_at(out, hub, clock, (seq - 1) / 10, result(seq))
    assert [json.loads(p)["seq"] for p in recorder.payloads()] == [1]
    clock.now = 1001.0  # no new inference (paused): the newest waiting one still goes out
    assert wait_for(lambda: len(recorder.payloads()) == 2)
    assert json.loads(recorder.payloads()[1])["seq"] == 10
    assert out.stats()["skipped_rate"] == 8  # 2..9, replaced by a newer one before their turn
    publish_at(out, hub, clock, 2.5, result(11))  # its turn has come: at once
    assert wait_for(lambda: len(recorder.payloads()) == 3)
    assert [json.loads(p)["seq"] for p in recorder.payloads()] == [1, 10, 11]


def test_publish_on_change(make_output: Any, recorder: Recorder, hub: FrameHub) -> None:
    out = make_output(recorder, iot_on_change=True)
    cat, dog = Item(1, "cat", 0.8), Item(0, "dog", 0.6)
    sets = [(cat,), (Item(1, "cat", 0.7),), (dog,), (cat, dog), (dog, cat), (cat,)]
    for seq, items in enumerate(sets, 1):
        hub.publish(IMAGE, result(seq, items))
    assert wait_for(lambda: len(recorder.payloads()) + out.stats()["skipped_unchanged"] == 6)
    assert [set(json.loads(p)) for p in recorder.payloads()] == [
        {"cat"}, {"dog"}, {"cat", "dog"}, {"cat"}]


def test_live_settings_apply(make_output: Any, recorder: Recorder, hub: FrameHub) -> None:
    out = make_output(recorder)
    hub.publish(IMAGE, result(1))
    assert wait_for(lambda: len(recorder.payloads()) == 1)
    out.apply(Settings(iot_payload="rich"))
    hub.publish(IMAGE, result(2))
    assert wait_for(lambda: len(recorder.payloads()) == 2)
    assert json.loads(recorder.payloads()[1])["seq"] == 2


def test_full_queue_drops_the_oldest_and_never_blocks_the_loop(
    make_output: Any, recorder: Recorder, hub: FrameHub
) -> None:
    recorder.block.clear()
    out = make_output(recorder)
    assert recorder.entered.wait(10)  # the publisher is stuck in its first send
    for seq in range(1, 101):
        hub.publish(IMAGE, result(seq))  # returns at once although nothing is being sent
    assert out.stats()["dropped_queue"] == 100 - QUEUE_SIZE
    recorder.block.set()
    assert wait_for(lambda: len(recorder.payloads()) == QUEUE_SIZE)
    ok, reason = out.health()
    assert ok and f"{100 - QUEUE_SIZE} dropped" in reason


def test_kept_items_are_the_newest(make_output: Any, recorder: Recorder, hub: FrameHub) -> None:
    recorder.block.clear()
    make_output(recorder, iot_payload="rich")
    assert recorder.entered.wait(10)
    for seq in range(1, 101):
        hub.publish(IMAGE, result(seq))
    recorder.block.set()
    assert wait_for(lambda: len(recorder.payloads()) == QUEUE_SIZE)
    assert [json.loads(p)["seq"] for p in recorder.payloads()] == list(
        range(101 - QUEUE_SIZE, 101))


def test_oversized_message_is_refused_and_counted(make_output: Any, recorder: Recorder,
                                                  hub: FrameHub) -> None:
    out = make_output(recorder, iot_payload="rich")
    items = tuple(Item(i, f"label-{i}-" + "x" * 2000, 0.5) for i in range(100))
    hub.publish(IMAGE, result(1, items))
    hub.publish(IMAGE, result(2))
    assert wait_for(lambda: len(recorder.payloads()) == 1)
    stats = out.stats()
    assert stats["refused_too_large"] == 1
    assert json.loads(recorder.payloads()[0])["seq"] == 2
    refused = [m for m in out.recent_messages() if m["status"].startswith("refused")]
    assert len(refused) == 1 and refused[0]["bytes"] > MAX_MESSAGE_BYTES


def test_publish_errors_are_counted_and_survived(make_output: Any, recorder: Recorder,
                                                 hub: FrameHub) -> None:
    out = make_output(recorder)
    assert wait_for(lambda: recorder.texts() == ["Loading stub model"])
    recorder.fail = True
    hub.publish(IMAGE, result(1))
    hub.publish(IMAGE, result(2))
    assert wait_for(lambda: out.stats()["errors"] == 3)  # 'model loaded' and two results
    ok, reason = out.health()
    assert not ok and "link down" in reason
    assert out.recent_messages()[-1]["status"].startswith("error: ConnectionError")
    recorder.fail = False
    hub.publish(IMAGE, result(3))
    assert wait_for(lambda: len(recorder.payloads()) == 1)
    assert out.health()[0]


def test_errors_are_published_the_seed_way_once(make_output: Any, recorder: Recorder,
                                                hub: FrameHub) -> None:
    out = make_output(recorder)
    out.report_error("model not loaded: model file not found: /x.xml")
    for seq in range(1, 6):
        hub.publish(IMAGE, result(seq, (), error="model not loaded: model file not found: /x.xml",
                                  model=None))
    hub.publish(IMAGE, result(6, (), error="no signal: camera gone", model=None))
    assert wait_for(lambda: drained(out) and len(recorder.texts()) == 3)
    assert recorder.texts() == [
        "Loading stub model",
        "Error in deeplens-dashboard: model not loaded: model file not found: /x.xml",
        "Error in deeplens-dashboard: no signal: camera gone",
    ]
    assert recorder.payloads() == []  # no inference, no {label: prob}


def test_recent_messages_for_the_control_page(make_output: Any, recorder: Recorder,
                                              hub: FrameHub) -> None:
    out = make_output(recorder)
    for seq in range(1, 31):
        hub.publish(IMAGE, result(seq))
    assert wait_for(lambda: len(recorder.payloads()) == 30)
    recent = out.recent_messages()
    assert len(recent) == 20
    assert set(recent[-1]) >= {"time", "topic", "payload", "status"}
    assert recent[-1]["payload"] == '{"cat": 0.75, "dog": 0.25}'
    assert recent[-1]["topic"] == "$aws/things/cam1/infer" and recent[-1]["status"] == "sent"


def test_log_publisher_writes_json_lines(make_output: Any, hub: FrameHub,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inference.iot.messages")
    out = make_output(LogPublisher())
    hub.publish(IMAGE, result(1))
    assert wait_for(lambda: out.stats()["sent"] == 3)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "inference.iot.messages"]
    assert lines[-1] == {"topic": "$aws/things/cam1/infer", "payload": '{"cat": 0.75, "dog": 0.25}'}


# -- thing name and publisher choice -----------------------------------------------------------
def test_thing_name_resolution() -> None:
    assert resolve_thing_name(Settings(thing_name="mine"), {"AWS_IOT_THING_NAME": "dev"}) == "mine"
    assert resolve_thing_name(Settings(), {"AWS_IOT_THING_NAME": "deeplens_abc"}) == "deeplens_abc"
    assert resolve_thing_name(Settings(), {}) == f"deeplens-{socket.gethostname().split('.')[0]}"
    assert infer_topic("deeplens_abc") == "$aws/things/deeplens_abc/infer"
    assert availability_topic("x") == "deeplens/x/availability"
    with pytest.raises(OutputError, match="--thing-name"):
        resolve_thing_name(Settings(thing_name="a+b"), {})


def test_greengrass_outside_a_core_falls_back(fake_device: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", raising=False)
    monkeypatch.delenv("MY_FUNCTION_ARN", raising=False)
    caplog.set_level(logging.INFO, logger="inference.outputs.iot")
    publisher = make_publisher(Settings(iot="auto"), "cam1")
    assert isinstance(publisher, LogPublisher)
    assert "greengrass_common" in caplog.text and "to the log" in caplog.text
    auto_mqtt = make_publisher(Settings(iot="auto", mqtt="mqtt://127.0.0.1:1"), "cam1")
    assert isinstance(auto_mqtt, MqttPublisher)
    with pytest.raises(OutputError, match="--iot: greengrass needs a Greengrass core"):
        make_publisher(Settings(iot="greengrass"), "cam1")


def test_real_greengrasssdk_outside_a_core_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed SDK (not the fake) raises ModuleNotFoundError('greengrass_common') here."""
    sys.modules.pop("greengrasssdk", None)
    monkeypatch.delenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", raising=False)
    try:
        assert isinstance(make_publisher(Settings(iot="auto"), "cam1"), LogPublisher)
    finally:
        sys.modules.pop("greengrasssdk", None)


def test_greengrass_publishes_bytes_on_the_thing_topic(
    fake_device: Path, monkeypatch: pytest.MonkeyPatch, make_output: Any, hub: FrameHub
) -> None:
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "token")
    monkeypatch.setenv("MY_FUNCTION_ARN", "arn:aws:lambda:us-east-1:1:function:deeplens-x:1")
    monkeypatch.setenv("AWS_IOT_THING_NAME", "deeplens_abc")
    import greengrasssdk

    publisher = make_publisher(Settings(), resolve_thing_name(Settings()))
    assert isinstance(publisher, GreengrassPublisher)
    out = make_output(publisher, thing_name="")
    hub.publish(IMAGE, result(1))
    assert wait_for(lambda: len(greengrasssdk.published) == 3)
    topics = {m["topic"] for m in greengrasssdk.published}
    assert topics == {"$aws/things/deeplens_abc/infer"}
    assert all(isinstance(m["payload"], bytes) for m in greengrasssdk.published)
    assert greengrasssdk.published[0]["payload"] == b"Loading stub model"
    assert greengrasssdk.published[-1]["payload"] == b'{"cat": 0.75, "dog": 0.25}'
    # A failing IPC call is counted; the publisher goes on.
    greengrasssdk.fail_publish = True
    try:
        hub.publish(IMAGE, result(2))
        assert wait_for(lambda: out.stats()["errors"] == 1)
        assert "InvocationException" in out.health()[1]
    finally:
        greengrasssdk.fail_publish = False
    hub.publish(IMAGE, result(3))
    assert wait_for(lambda: len(greengrasssdk.published) == 4)


def test_build_outputs_checks_the_iot_options(hub: FrameHub, tmp_path: Path) -> None:
    assert build_outputs(Settings(fifo="off", iot="off"), hub) == []
    outputs = build_outputs(Settings(fifo="off", iot="log", thing_name="cam1"), hub)
    assert [o.name for o in outputs] == ["iot"]
    with pytest.raises(OutputError, match="--mqtt"):
        build_outputs(Settings(fifo="off", iot="mqtt"), hub)
    with pytest.raises(OutputError, match="--mqtt-ca: file not found"):
        build_outputs(Settings(fifo="off", iot="mqtt", mqtt="mqtts://127.0.0.1:8883",
                               mqtt_ca=str(tmp_path / "missing.pem")), hub)


# -- a real broker -----------------------------------------------------------------------------
class Broker:
    def __init__(self, exe: str, port: int, folder: Path, tls: dict[str, Path] | None = None,
                 users: dict[str, str] | None = None) -> None:
        self.exe, self.port, self.folder = exe, port, folder
        self.conf = folder / f"mosquitto-{port}.conf"
        self.log = folder / f"mosquitto-{port}.log"
        # Run as root, mosquitto drops to user "mosquitto", which cannot read our tmp files.
        user = pwd.getpwuid(os.getuid()).pw_name
        lines = [f"listener {port} 127.0.0.1", "persistence false", f"user {user}"]
        if users:
            passwords = folder / f"passwords-{port}"
            passwords.touch(mode=0o600)
            for name, password in users.items():
                subprocess.run([require_tool("mosquitto_passwd"), "-b", str(passwords), name, password],
                               check=True, capture_output=True, timeout=30)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        if tls:
            lines += [f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}",
                      "require_certificate true"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{port}"

    def start(self) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - owned by proc
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited: {(self.folder / f'mosquitto-{self.port}.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail("mosquitto did not start listening")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    exe = require_tool("mosquitto")
    made: list[Broker] = []

    def make(port: int | None = None, tls: dict[str, Path] | None = None,
             users: dict[str, str] | None = None) -> Broker:
        broker = Broker(exe, port or free_port(), tmp_path, tls, users)
        made.append(broker)
        return broker

    try:
        yield make
    finally:
        for broker in made:
            broker.kill()


@pytest.fixture
def broker(brokers: Callable[..., Broker]) -> Broker:
    b = brokers()
    b.start()
    return b


class Subscriber:
    """A paho subscriber that (re)subscribes on every connect and records what arrives."""

    def __init__(self, port: int, topics: list[str], tls: dict[str, Path] | None = None,
                 login: tuple[str, str] | None = None) -> None:
        self.topics = topics
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}")
        if tls:
            self.client.tls_set(ca_certs=str(tls["ca"]), certfile=str(tls["client_cert"]),
                                keyfile=str(tls["client_key"]))
        if login:
            self.client.username_pw_set(*login)
        self.client.reconnect_delay_set(1, 1)
        self.ready = threading.Event()  # subscribed (the broker acknowledged)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe([(topic, 1) for topic in self.topics])

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, codes: Any, props: Any) -> None:
        self.ready.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscribers() -> Iterator[Callable[..., Subscriber]]:
    made: list[Subscriber] = []

    def make(port: int, thing: str, tls: dict[str, Path] | None = None,
             login: tuple[str, str] | None = None, topics: list[str] | None = None) -> Subscriber:
        sub = Subscriber(port, topics or [infer_topic(thing), availability_topic(thing)], tls, login)
        made.append(sub)
        # Messages published before the subscription reaches the broker would be missed.
        assert sub.ready.wait(20), "subscriber never subscribed"
        return sub

    try:
        yield make
    finally:
        for sub in made:
            sub.stop()


def mqtt_output(hub: FrameHub, url: str, thing: str, **kw: Any) -> IotOutput:
    kw.setdefault("iot_max_rate", 0)
    settings = Settings(iot="mqtt", mqtt=url, thing_name=thing, model="stub", **kw)
    return IotOutput(settings, hub, make_publisher(settings, thing))


@pytest.mark.device
def test_mqtt_subscriber_receives_the_seed_payload(broker: Broker, subscribers: Any, hub: FrameHub,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inference.outputs.iot")
    thing = "cam-seed"
    sub = subscribers(broker.port, thing)
    out = mqtt_output(hub, broker.url, thing)
    out.start()
    try:
        assert wait_for(lambda: out.publisher.status()[0])
        assert wait_for(lambda: b"online" in sub.on(availability_topic(thing)))
        for seq in range(1, 4):
            hub.publish(IMAGE, result(seq))
        topic = infer_topic(thing)
        assert wait_for(lambda: len(sub.on(topic)) == 5)
        assert sub.on(topic) == [b"Loading stub model", b"stub model loaded"] + [
            b'{"cat": 0.75, "dog": 0.25}'] * 3
        assert out.health()[0]
    finally:
        stop(out)
    # A clean stop says offline itself (the broker only sends the will on a lost connection).
    assert wait_for(lambda: sub.on(availability_topic(thing))[-1:] == [b"offline"])
    # ... and is not reported as a lost connection
    assert wait_for(lambda: "MQTT disconnected from" in caplog.text)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def rich_seqs(payloads: list[bytes]) -> list[int]:
    """The seqs of the results among ``payloads``, first arrivals only (QoS 1 may repeat one
    that was on the wire when the connection died)."""
    seen: list[int] = []
    for payload in payloads:
        if payload.startswith(b"{"):
            seq = json.loads(payload)["seq"]
            if seq not in seen:
                seen.append(seq)
    return seen


def early_output(hub: FrameHub, broker: Broker, thing: str, retry: int, **settings: Any) -> IotOutput:
    """A rich-payload MQTT output to ``broker`` before it is up, retrying every ``retry`` s."""
    settings.setdefault("iot_max_rate", 0)
    return IotOutput(Settings(iot="mqtt", mqtt=broker.url, thing_name=thing, model="stub",
                              iot_payload="rich", **settings),
                     hub, MqttPublisher(broker.url, thing, min_delay=retry, max_delay=retry))


@pytest.mark.device
def test_broker_absent_at_start_then_started(brokers: Any, subscribers: Any, hub: FrameHub) -> None:
    thing = "cam-late"
    broker = brokers()
    # Retries 3 s apart: the subscriber is in place before the publisher's first connection.
    out = early_output(hub, broker, thing, retry=3)
    out.start()
    try:
        for seq in range(1, 6):
            hub.publish(IMAGE, result(seq))
        # "Loading", "stub model loaded" and five results wait for the broker.
        assert wait_for(lambda: out.backlog == 7), out.stats()
        ok, reason = out.health()
        assert not ok and broker.url in reason and "7 messages waiting" in reason, reason
        broker.start()
        sub = subscribers(broker.port, thing)
        topic = infer_topic(thing)
        assert wait_for(lambda: rich_seqs(sub.on(topic)) == [1, 2, 3, 4, 5], timeout=30), sub.on(topic)
        assert sub.on(topic)[:2] == [b"Loading stub model", b"stub model loaded"]
        assert out.backlog == 0 and out.health()[0]
        assert out.stats()["dropped_backlog"] == 0
    finally:
        stop(out)


def outage_service(url: str, thing: str) -> tuple[Service, IotOutput, MqttPublisher]:
    settings = Settings(source="synthetic", iot="mqtt", mqtt=url, thing_name=thing,
                        model="stub", fifo="off", iot_payload="rich", iot_queue=5000, iot_max_rate=0)
    service = Service(settings, lambda s: SyntheticSource(160, 120, fps=100), lambda s: _StubModel())
    publisher = MqttPublisher(url, thing, min_delay=1, max_delay=1)
    out = IotOutput(settings, service.hub, publisher)
    service.add_output(out)
    service.prepare()
    service.start()
    return service, out, publisher


@pytest.mark.device
def test_a_network_outage_loses_nothing(brokers: Any, subscribers: Any) -> None:
    """The link to the broker goes down for a while and comes back: every result made meanwhile
    is delivered, in order, with no gap, and the loop never notices."""
    thing = "cam-outage"
    broker = brokers()
    broker.start()
    sub = subscribers(broker.port, thing)
    link = Relay(broker.port)
    link.start()
    service, out, publisher = outage_service(f"mqtt://127.0.0.1:{link.port}", thing)
    topic = infer_topic(thing)
    try:
        assert wait_for(lambda: len(sub.on(topic)) > 20, timeout=20)
        before = _frames_in(service, 1.0)
        link.cut()
        assert wait_for(lambda: not publisher.connected)
        during = _frames_in(service, 1.0)
        assert during > 0.5 * before, (before, during)  # the loop did not notice the outage
        assert wait_for(lambda: out.backlog > 20)
        health = out.health()
        assert not health[0] and "messages waiting" in health[1], health
        link.restore()
        assert wait_for(lambda: publisher.connected, timeout=40)
        service.loop.pause()
        last = service.hub.seq
        assert wait_for(lambda: out.backlog == 0 and publisher.in_flight == 0, timeout=30), out.stats()
        assert wait_for(lambda: (rich_seqs(sub.on(topic)) or [0])[-1] >= last, timeout=20)
        seqs = rich_seqs(sub.on(topic))
        # Every inference from the first one received to the last, once each, in order.
        assert seqs == list(range(seqs[0], seqs[-1] + 1)), [
            (a, b) for a, b in zip(seqs, seqs[1:]) if b != a + 1]
        stats = out.stats()
        assert stats["dropped_backlog"] == 0 and stats["dropped_queue"] == 0, stats
        assert publisher.connects == 2 and publisher.disconnects == 1
    finally:
        service.stop()
        link.stop()


@pytest.mark.device
def test_broker_killed_mid_run_and_restarted(brokers: Any, subscribers: Any) -> None:
    """The broker itself dies (SIGKILL) and comes back on the same port: what was made meanwhile
    goes out in order once it is back. (What the dead broker had acknowledged but not yet passed
    on dies with it: that is the broker's to keep, not ours; the outage test above has no gap.)"""
    thing = "cam-killed"
    broker = brokers()
    broker.start()
    sub = subscribers(broker.port, thing)
    service, out, publisher = outage_service(broker.url, thing)
    topic = infer_topic(thing)
    try:
        assert wait_for(lambda: len(sub.on(topic)) > 20, timeout=20)
        broker.kill()
        assert wait_for(lambda: not publisher.connected)
        assert wait_for(lambda: out.backlog > 20)
        waiting = out.backlog
        broker.start()
        assert wait_for(lambda: publisher.connected, timeout=40)
        service.loop.pause()
        last = service.hub.seq
        assert wait_for(lambda: out.backlog == 0, timeout=30), out.stats()
        assert wait_for(lambda: (rich_seqs(sub.on(topic)) or [0])[-1] >= last, timeout=20)
        seqs = rich_seqs(sub.on(topic))
        assert seqs == sorted(seqs)
        assert len(seqs) >= last - seqs[0] + 1 - IN_FLIGHT - 5 and waiting > 20
        assert out.stats()["dropped_backlog"] == 0
        assert publisher.connects == 2 and publisher.disconnects == 1
    finally:
        service.stop()


@pytest.mark.device
def test_a_full_backlog_drops_the_oldest_and_delivers_the_rest_in_order(
        brokers: Any, subscribers: Any, hub: FrameHub) -> None:
    thing = "cam-bounded"
    broker = brokers()
    out = early_output(hub, broker, thing, retry=2, iot_queue=5)
    out.start()
    try:
        for seq in range(1, 21):
            hub.publish(IMAGE, result(seq))
        # 2 status lines + 20 results into 5 places: the 17 oldest go, counted.
        assert wait_for(lambda: out.stats()["dropped_backlog"] == 17), out.stats()
        assert out.backlog == 5
        broker.start()
        sub = subscribers(broker.port, thing)
        assert wait_for(lambda: rich_seqs(sub.on(infer_topic(thing))) == [16, 17, 18, 19, 20],
                        timeout=30), sub.on(infer_topic(thing))
        assert [m["status"] for m in out.recent_messages()].count("dropped: the backlog was full") >= 10
    finally:
        stop(out)


def _frames_in(service: Service, seconds: float) -> int:
    start = service.hub.published
    time.sleep(seconds)
    return service.hub.published - start


LWT_SCRIPT = """
import sys, time
from inference.outputs.iot import IotOutput, make_publisher
from inference.pipeline.frames import FrameHub
from inference.settings import Settings
url, thing = sys.argv[1], sys.argv[2]
settings = Settings(iot="mqtt", mqtt=url, thing_name=thing)
out = IotOutput(settings, FrameHub(), make_publisher(settings, thing))
out.start()
deadline = time.monotonic() + 60
while not out.publisher.connected and time.monotonic() < deadline:
    time.sleep(0.05)
print("ready" if out.publisher.connected else "not connected", flush=True)
while time.monotonic() < deadline:  # until the test kills us (bounded all the same)
    time.sleep(0.1)
"""


@pytest.mark.device
def test_last_will_offline_when_the_process_is_killed(broker: Broker, subscribers: Any,
                                                      tmp_path: Path) -> None:
    thing = "cam-lwt"
    sub = subscribers(broker.port, thing)
    proc = subprocess.Popen([sys.executable, "-c", LWT_SCRIPT, broker.url, thing], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=product_pythonpath()))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        avail = availability_topic(thing)
        assert wait_for(lambda: sub.on(avail)[-1:] == [b"online"])
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_for(lambda: sub.on(avail)[-1:] == [b"offline"])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    # Retained: whoever subscribes later learns the device is offline.
    late = subscribers(broker.port, thing)
    assert wait_for(lambda: late.on(avail) == [b"offline"])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True,
                   timeout=60)


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as AWS IoT uses."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    for name, extra in (("server", ["-addext", "subjectAltName=IP:127.0.0.1"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", *extra, cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-copy_extensions", "copy",
                 cwd=d)
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key",
            "client_cert": d / "client.pem", "client_key": d / "client.key"}


def test_mqtts_with_a_client_certificate(brokers: Any, subscribers: Any, certs: dict[str, Path],
                                         hub: FrameHub) -> None:
    broker = brokers(tls=certs)
    broker.start()
    thing = "cam-tls"
    sub = subscribers(broker.port, thing, tls=certs)
    out = mqtt_output(hub, broker.url, thing, mqtt_ca=str(certs["ca"]),
                      mqtt_cert=str(certs["client_cert"]), mqtt_key=str(certs["client_key"]))
    out.start()
    try:
        assert wait_for(lambda: out.publisher.status()[0])
        hub.publish(IMAGE, result(1))
        assert wait_for(lambda: b'{"cat": 0.75, "dog": 0.25}' in sub.on(infer_topic(thing)))
    finally:
        stop(out)


def test_offline_publish_is_refused_so_the_output_keeps_the_message() -> None:
    publisher = MqttPublisher(f"mqtt://127.0.0.1:{free_port()}", "cam-offline")
    assert not publisher.wait_ready(0.05)
    with pytest.raises(PublishOffline):
        publisher.publish("t", b"{}")


# -- logins, ALPN, topic and client id -----------------------------------------------------------
@pytest.mark.device
def test_login_by_url_and_by_options_with_a_password_file(
        brokers: Any, subscribers: Any, hub: FrameHub, tmp_path: Path) -> None:
    broker = brokers(users={"cam": "s3cret:/@x", "reader": "r"})
    broker.start()
    thing = "cam-login"
    sub = subscribers(broker.port, thing, login=("reader", "r"))
    # In the URL, percent-encoded as URLs want it.
    url = f"mqtt://cam:s3cret%3A%2F%40x@127.0.0.1:{broker.port}"
    out = mqtt_output(hub, url, thing)
    out.start()
    try:
        assert wait_for(lambda: out.publisher.status()[0]), out.health()
        assert "s3cret" not in out.publisher.status()[1] and "s3cret" not in out.health()[1]
        hub.publish(IMAGE, result(1))
        assert wait_for(lambda: b'{"cat": 0.75, "dog": 0.25}' in sub.on(infer_topic(thing)))
    finally:
        stop(out)
    # As options: the user name, and the password from a file only its owner reads.
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret:/@x\n")
    secret.chmod(0o600)
    out = mqtt_output(hub, f"mqtt://127.0.0.1:{broker.port}", thing, mqtt_username="cam",
                      mqtt_password_file=str(secret))
    out.start()
    try:
        assert wait_for(lambda: out.publisher.status()[0]), out.health()
        hub.publish(IMAGE, result(2))
        assert wait_for(lambda: len(sub.on(infer_topic(thing))) >= 2)
    finally:
        stop(out)
    with pytest.raises(OutputError, match="--mqtt-password-file: cannot read"):
        make_publisher(Settings(iot="mqtt", mqtt=url, mqtt_username="cam",
                                mqtt_password_file=str(tmp_path / "missing")), thing)


@pytest.mark.device
def test_a_refused_login_is_reported_once_as_such(brokers: Any, hub: FrameHub,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inference.outputs.iot")
    broker = brokers(users={"cam": "right"})
    broker.start()
    settings = Settings(iot="mqtt", mqtt=broker.url, thing_name="cam-refused", model="stub",
                        mqtt_username="cam", mqtt_password="wrong")
    publisher = MqttPublisher(broker.url, "cam-refused", username="cam", password="wrong",
                              min_delay=1, max_delay=1)
    out = IotOutput(settings, hub, publisher)
    out.start()
    try:
        assert wait_for(lambda: publisher.refusals >= 3, timeout=30), publisher.status()
        ok, message = out.health()
        assert not ok and "login refused" in message, message
        assert "Unspecified" not in message
        refused = [r for r in caplog.records if "refused the connection" in r.getMessage()]
        assert len(refused) == 1, [r.getMessage() for r in refused]
        assert refused[0].levelno == logging.WARNING
        assert "wrong" not in caplog.text
    finally:
        stop(out)


class Relay:
    """Forwards TCP connections from a port of its own to a broker. ``cut()`` drops every
    connection and refuses new ones, as a network outage does, without the broker losing what it
    holds; ``restore()`` listens again on the same port. With ``tls`` it is the front door AWS
    IoT Core keeps on port 443: TLS with a client certificate, and only for clients that ask for
    the ``x-amzn-mqtt-ca`` ALPN protocol."""

    def __init__(self, backend_port: int, tls: dict[str, Path] | None = None) -> None:
        self.backend_port = backend_port
        self.context: ssl.SSLContext | None = None
        if tls:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(str(tls["cert"]), str(tls["key"]))
            self.context.load_verify_locations(str(tls["ca"]))
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.set_alpn_protocols(["x-amzn-mqtt-ca"])
        self.port = 0
        self.negotiated: list[str | None] = []
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._listener: socket.socket | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        listener.settimeout(0.2)
        self.port = int(listener.getsockname()[1])
        self._listener = listener
        self._open.set()
        self._spawn(self._accept, listener)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="test-relay")
        thread.start()
        self._threads.append(thread)

    def _accept(self, listener: socket.socket) -> None:
        while self._open.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client: socket.socket = conn
            if self.context is not None:
                conn.settimeout(5)
                try:
                    client = self.context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    conn.close()
                    continue
                self.negotiated.append(client.selected_alpn_protocol())
                if client.selected_alpn_protocol() != "x-amzn-mqtt-ca":
                    client.close()
                    continue
            backend = socket.create_connection(("127.0.0.1", self.backend_port), timeout=5)
            with self._lock:
                self._sockets += [client, backend]
            self._spawn(self._pump, client, backend)
            self._spawn(self._pump, backend, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.2)
        try:
            while self._open.is_set():
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        self._open.clear()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)
        self._threads = []

    def restore(self) -> None:
        self.start()

    stop = cut


def test_alpn_for_aws_iot_core_on_port_443(brokers: Any, subscribers: Any, certs: dict[str, Path],
                                           hub: FrameHub) -> None:
    from inference.outputs.iot import alpn_protocols, parse_target

    # auto: AWS IoT Core's protocol on 443 only, and never without TLS.
    assert alpn_protocols("auto", parse_target("mqtts://x.iot.eu-west-1.amazonaws.com:443")) == [
        "x-amzn-mqtt-ca"]
    assert alpn_protocols("auto", parse_target("mqtts://x.iot.eu-west-1.amazonaws.com")) == []
    assert alpn_protocols("auto", parse_target("mqtt://broker:443")) == []
    assert alpn_protocols("a,b", parse_target("mqtts://broker:8883")) == ["a", "b"]

    broker = brokers()
    broker.start()
    front = Relay(broker.port, tls=certs)
    front.start()
    thing = "cam-alpn"
    sub = subscribers(broker.port, thing)
    url = f"mqtts://127.0.0.1:{front.port}"
    tls = {"mqtt_ca": str(certs["ca"]), "mqtt_cert": str(certs["client_cert"]),
           "mqtt_key": str(certs["client_key"])}
    try:
        # Without the protocol the front door turns the connection away, as AWS does.
        out = mqtt_output(hub, url, thing, mqtt_alpn="off", **tls)
        out.start()
        try:
            assert wait_for(lambda: None in front.negotiated)
            assert not out.publisher.status()[0]
        finally:
            stop(out)
        out = mqtt_output(hub, url, thing, mqtt_alpn="x-amzn-mqtt-ca", **tls)
        out.start()
        try:
            assert wait_for(lambda: out.publisher.status()[0]), out.health()
            hub.publish(IMAGE, result(1))
            assert wait_for(lambda: b'{"cat": 0.75, "dog": 0.25}' in sub.on(infer_topic(thing)))
            assert "x-amzn-mqtt-ca" in front.negotiated
        finally:
            stop(out)
    finally:
        front.stop()


def test_results_topic_and_client_id_options(brokers: Any, subscribers: Any, hub: FrameHub) -> None:
    broker = brokers()
    broker.start()
    thing = "cam-topic"
    sub = subscribers(broker.port, thing, topics=["deeplens/cam-topic/infer"])
    out = mqtt_output(hub, broker.url, thing, iot_topic="deeplens/{thing}/infer",
                      mqtt_client_id="dashboard-7")
    out.start()
    try:
        assert out.topic == "deeplens/cam-topic/infer"
        hub.publish(IMAGE, result(1))
        assert wait_for(lambda: b'{"cat": 0.75, "dog": 0.25}' in sub.on("deeplens/cam-topic/infer"))
        assert "as dashboard-7" in broker.log.read_text()
    finally:
        stop(out)
    # The default client id is the thing name, as AWS IoT policies expect.
    assert mqtt_output(hub, broker.url, thing).publisher.client_id == thing  # type: ignore[attr-defined]


def test_mqtt_options_are_checked_and_the_password_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    for field, bad, message in (
        ("mqtt", "mqtt://h:99999", "port must be 1..65535"),
        ("mqtt", "mqtt://h:0", "port must be 1..65535"),
        ("mqtt", "tcp://u:pw@h", "expected mqtt://"),
        ("iot_topic", "deeplens/#", "wildcards"),
        ("iot_topic", " ", "must not be empty"),
        ("iot_queue", "0", "greater than or equal to 1,"),
        ("iot_queue", "100001", "less than or equal to 100000,"),
        ("mqtt_alpn", "a,,b", "expected auto, off"),
    ):
        with pytest.raises(ConfigError, match=message) as info:
            Settings.load(flags={field: bad}, env={})
        assert info.value.option == "--" + field.replace("_", "-")
        assert "pw" not in str(info.value)
    settings = Settings.load(env={"DEEPLENS_MQTT": "mqtts://cam:pa55@broker:8883",
                                  "DEEPLENS_MQTT_PASSWORD": "other"})
    shown = json.dumps(settings.public())
    assert "pa55" not in shown and "other" not in shown
    assert settings.public()["mqtt"] == "mqtts://cam:***@broker:8883"
    assert settings.mqtt_password == "other"


def test_default_is_one_message_a_second_without_empty_ones_on_mosquitto(
    broker: Broker, subscribers: Any, hub: FrameHub
) -> None:
    """The default: at most 1 result a second (not one per frame, ~25/s: a real bill on AWS IoT),
    the newest one always going out, and no {} when nothing passes the threshold."""
    assert Settings().iot_max_rate == 1.0 and Settings().iot_send_empty is False
    thing = "cam-rate"
    sub = subscribers(broker.port, thing)
    clock = Clock()
    settings = Settings(iot="mqtt", mqtt=broker.url, thing_name=thing, model="stub", iot_payload="rich")
    out = IotOutput(settings, hub, make_publisher(settings, thing), clock=clock)
    out.start()
    topic = infer_topic(thing)
    try:
        assert wait_for(lambda: out.publisher.status()[0])
        for seq in range(1, 25):  # most of a second of a 25 fps camera
            publish_at(out, hub, clock, (seq - 1) * 0.04, result(seq))
        publish_at(out, hub, clock, 0.96, result(25, items=()))  # nothing above the threshold
        publish_at(out, hub, clock, 0.98, result(26, items=()))
        for seq in range(27, 31):
            publish_at(out, hub, clock, 2.2 + (seq - 27) * 0.04, result(seq))
    finally:
        stop(out)  # the newest result, 30, waiting for its turn, goes out at stop
    assert wait_for(lambda: rich_seqs(sub.on(topic)) == [1, 27, 30]), sub.on(topic)
    results = [json.loads(p) for p in sub.on(topic) if p.startswith(b"{")]
    assert all(r["results"] for r in results), "no empty result on the topic"
    stats = out.stats()
    # 2..24 held back, then gone (replaced, or nothing passed the threshold after them); 28, 29
    assert stats["skipped_empty"] == 2 and stats["skipped_rate"] == 23 + 2, stats


def test_every_frame_and_empty_messages_are_one_option_away_on_mosquitto(
    broker: Broker, subscribers: Any, hub: FrameHub
) -> None:
    thing = "cam-every"
    sub = subscribers(broker.port, thing)
    out = mqtt_output(hub, broker.url, thing, iot_max_rate=0, iot_send_empty=True)
    out.start()
    topic = infer_topic(thing)
    try:
        assert wait_for(lambda: out.publisher.status()[0])
        for seq in range(1, 11):
            hub.publish(IMAGE, result(seq, items=() if seq % 2 else None))
            assert wait_for(lambda: drained(out))
        assert wait_for(lambda: len(sub.on(topic)) == 2 + 10), sub.on(topic)
    finally:
        stop(out)
    assert sub.on(topic)[2:] == [b"{}", b'{"cat": 0.75, "dog": 0.25}'] * 5
