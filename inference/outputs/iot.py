"""IotOutput: every inference on the IoT topic, as the seed's ``client.publish`` did, without ever
holding up the loop.

Topic ``$aws/things/<thing>/infer``; payload by default exactly the seed's
``json.dumps({label_name: prob, ...})``, one message per inference. The loop only hands each new
hub item to a bounded queue (a hub listener: O(1), no I/O); the named thread ``iot-publisher``
builds the payloads and sends them. When the publisher is slower than the loop the oldest items
are dropped and counted.

A listener rather than ``hub.wait_newer``: a waiter scheduled late skips frames silently, while
the seed's contract is one message per inference; with the listener every inference is either
published, filtered (rate limit, on-change) or counted as dropped.

Publishers (``--iot``): ``greengrass`` (``greengrasssdk.client('iot-data')``, only inside a
Greengrass core), ``mqtt`` (paho-mqtt 2.x to any broker, TLS with a client certificate for AWS IoT
Core), ``log`` (JSON lines) and ``off``. ``auto`` tries greengrass, then mqtt when ``--mqtt`` is
given, else log.

MQTT availability goes to ``deeplens/<thing>/availability`` (retained ``online`` on connect, a
retained last will ``offline``), not under ``$aws/``: AWS IoT Core reserves topics starting with
``$aws`` for its own services and refuses arbitrary publishes (and retained messages) there.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from inference.affinity import serving_thread
from inference.config import Settings
from inference.hub import FrameHub, Published
from inference.logutil import RateLimitedLog
from inference.outputs import OutputError

log = logging.getLogger(__name__)
message_log = logging.getLogger("inference.iot.messages")

MAX_MESSAGE_BYTES = 128 * 1024  # the AWS IoT message size limit
OFFLINE_QUEUE = 32  # QoS 1 status messages paho keeps while disconnected
QUEUE_SIZE = 64
RECENT_MESSAGES = 20
ERROR_REPEAT_SECONDS = 60.0  # the same error goes out again at most this often
SOURCE_NAME = "deeplens-dashboard"
INFER_TOPIC = "$aws/things/{thing}/infer"
AVAILABILITY_TOPIC = "deeplens/{thing}/availability"


def resolve_thing_name(settings: Settings, env: Mapping[str, str] | None = None) -> str:
    """``--thing-name``, else ``$AWS_IOT_THING_NAME`` (set on the device), else deeplens-<host>."""
    env = os.environ if env is None else env
    name = settings.thing_name or env.get("AWS_IOT_THING_NAME", "").strip()
    if not name:
        name = f"deeplens-{socket.gethostname().split('.')[0] or 'host'}"
    if any(ch in name for ch in "+#\0/") or len(name) > 128:
        raise OutputError("--thing-name", f"{name!r} cannot be part of an MQTT topic")
    return name


def infer_topic(thing: str) -> str:
    return INFER_TOPIC.format(thing=thing)


def availability_topic(thing: str) -> str:
    return AVAILABILITY_TOPIC.format(thing=thing)


class PublishOffline(Exception):
    """The publisher has no connection right now; the message is dropped, not an error."""


class Publisher(Protocol):
    name: str

    def start(self) -> None: ...

    def publish(self, topic: str, payload: bytes, important: bool = False) -> bool:
        """Send one message: True when sent, False when queued until a connection is back
        (``important`` messages only); raises PublishOffline when dropped for lack of one."""
        ...

    def status(self) -> tuple[bool, str]: ...

    def close(self, timeout: float = 2.0) -> None: ...


# -- publishers ----------------------------------------------------------------------------------
class GreengrassPublisher:
    """The seed's path: the Greengrass core's local IPC. Creating it outside a core raises
    ``ModuleNotFoundError: greengrass_common``, which ``make_publisher`` turns into a fallback."""

    name = "greengrass"

    def __init__(self) -> None:
        import greengrasssdk

        self._client = greengrasssdk.client("iot-data")

    def start(self) -> None:
        pass

    def publish(self, topic: str, payload: bytes, important: bool = False) -> bool:
        # bytes: a str payload breaks the SDK's IPC call under Python 3.
        self._client.publish(topic=topic, payload=payload)
        return True

    def status(self) -> tuple[bool, str]:
        return True, "Greengrass core IPC"

    def close(self, timeout: float = 2.0) -> None:
        pass


class LogPublisher:
    """Each message as one JSON line on the ``inference.iot.messages`` logger.

    Asked for (``--iot log``) the lines come at INFO; as the quiet fallback of ``auto`` they come
    at DEBUG, so a default run's terminal is not flooded at the frame rate (the control page
    still shows the last messages)."""

    name = "log"

    def __init__(self, level: int = logging.INFO) -> None:
        self.level = level

    def start(self) -> None:
        pass

    def publish(self, topic: str, payload: bytes, important: bool = False) -> bool:
        text = payload.decode("utf-8", errors="replace")
        message_log.log(
            logging.INFO if important else self.level, "%s",
            json.dumps({"topic": topic, "payload": text}),
        )
        return True

    def status(self) -> tuple[bool, str]:
        return True, "JSON lines in the log"

    def close(self, timeout: float = 2.0) -> None:
        pass


class NullPublisher:
    name = "off"

    def start(self) -> None:
        pass

    def publish(self, topic: str, payload: bytes, important: bool = False) -> bool:
        return True

    def status(self) -> tuple[bool, str]:
        return True, "off"

    def close(self, timeout: float = 2.0) -> None:
        pass


class MqttPublisher:
    """paho-mqtt 2.x in its own network thread (``loop_start``). ``connect_async`` makes a broker
    that is down at start a non-event; paho reconnects with exponential backoff. Results go out
    at QoS 0 (a stale inference is not worth a retry); availability at QoS 1, retained."""

    name = "mqtt"

    def __init__(
        self,
        url: str,
        thing: str,
        ca: str = "",
        cert: str = "",
        key: str = "",
        client_id: str | None = None,
        min_delay: int = 1,
        max_delay: int = 30,
        send_timeout: float = 2.0,
        nice: int = 0,
    ) -> None:
        self.nice = nice  # added to paho's network thread's nice value, from its first callback
        self.thread_nice: int | None = None
        try:
            import paho.mqtt.client as mqtt
            from paho.mqtt.enums import CallbackAPIVersion
        except ImportError as exc:
            raise OutputError("--mqtt", f"needs the paho-mqtt package ({exc})") from None
        self._mqtt = mqtt
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise OutputError("--mqtt", f"expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {url!r}")
        self.tls = parts.scheme == "mqtts"
        self.host = parts.hostname
        self.port = parts.port or (8883 if self.tls else 1883)
        self.url = f"{parts.scheme}://{self.host}:{self.port}"
        self.availability = availability_topic(thing)
        self.send_timeout = send_timeout
        # AWS IoT Core policies usually tie the client id to the thing name.
        self.client_id = client_id or thing
        self._connected = threading.Event()
        self._started = False
        self._closing = False
        self._last_reason = "not connected yet"
        self.connects = 0
        self.disconnects = 0

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id)
        if self.tls:
            for option, path in (("--mqtt-ca", ca), ("--mqtt-cert", cert), ("--mqtt-key", key)):
                if path and not Path(path).is_file():
                    raise OutputError(option, f"file not found: {path}")
            if bool(cert) != bool(key):
                raise OutputError("--mqtt-cert", "--mqtt-cert and --mqtt-key go together")
            try:
                client.tls_set(ca_certs=ca or None, certfile=cert or None, keyfile=key or None)
            except Exception as exc:  # bad PEM, wrong key: ssl raises its own error types
                option = "--mqtt-cert" if cert else "--mqtt-ca"
                raise OutputError(option, f"TLS set-up failed: {exc}") from None
        elif ca or cert or key:
            log.warning("--mqtt-ca/--mqtt-cert/--mqtt-key are ignored for %s (use mqtts://)", self.url)
        client.will_set(self.availability, "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=min_delay, max_delay=max_delay)
        client.max_queued_messages_set(OFFLINE_QUEUE)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        self._client = client
        self._unreachable_logged = False

    def _lower_network_thread(self) -> None:
        # Called on paho's network thread (its callbacks run there); it writes every message.
        if self.thread_nice is None:
            self.thread_nice = serving_thread(self.nice)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._lower_network_thread()
        if getattr(reason, "is_failure", False):
            self._last_reason = f"connection refused: {reason}"
            log.warning("MQTT %s refused the connection: %s", self.url, reason)
            return
        self.connects += 1
        self._unreachable_logged = False
        self._connected.set()
        self._last_reason = "connected"
        client.publish(self.availability, "online", qos=1, retain=True)
        log.info("MQTT connected to %s (availability on %s)", self.url, self.availability)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._lower_network_thread()
        self._last_reason = "broker unreachable; retrying with backoff"
        # Once per outage: a broker that stays away must not fill the log.
        if not self._unreachable_logged:
            self._unreachable_logged = True
            log.warning("MQTT broker %s unreachable; retrying with backoff", self.url)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._closing:
            self._last_reason = "closed"
            log.info("MQTT disconnected from %s", self.url)
            return
        self._last_reason = f"disconnected ({reason}); reconnecting"
        if was:
            self.disconnects += 1
            log.warning("MQTT connection to %s lost (%s); reconnecting with backoff", self.url, reason)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._closing = False
        self._client.connect_async(self.host, self.port, keepalive=30)
        self._client.loop_start()
        log.info("MQTT publishing to %s as %r", self.url, self.client_id)

    def publish(self, topic: str, payload: bytes, important: bool = False) -> bool:
        mqtt = self._mqtt
        if important:
            # Status lines ('Loading ... model', errors) at QoS 1: paho keeps them (bounded by
            # max_queued_messages) while the broker is away and sends them on connect.
            info = self._client.publish(topic, payload, qos=1)
            if info.rc == mqtt.MQTT_ERR_NO_CONN:
                return False
        else:
            if not self._connected.is_set():
                raise PublishOffline(f"not connected to {self.url}")
            info = self._client.publish(topic, payload, qos=0)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            raise PublishOffline(f"not connected to {self.url}")
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise PublishOffline(f"not connected to {self.url} and its offline queue is full")
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"MQTT publish failed: {mqtt.error_string(info.rc)}")
        # Waiting for the socket write keeps paho's own outgoing buffer from growing without
        # bound behind a slow link; the bounded queue in front of us absorbs the wait. A lost
        # connection ends the wait early.
        deadline = time.monotonic() + self.send_timeout
        try:
            while not info.is_published() and self._connected.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"MQTT message not sent within {self.send_timeout:.0f} s")
                info.wait_for_publish(min(0.1, remaining))
        except (RuntimeError, ValueError) as exc:
            if self._connected.is_set():
                raise
            if important:
                return False
            raise PublishOffline(f"connection to {self.url} lost: {exc}") from None
        if not info.is_published():
            if important:
                return False  # paho still holds it for the next connection
            raise PublishOffline(f"connection to {self.url} lost")
        return True

    def status(self) -> tuple[bool, str]:
        if self._connected.is_set():
            return True, f"connected to {self.url}"
        return False, f"{self.url}: {self._last_reason}"

    def close(self, timeout: float = 2.0) -> None:
        if not self._started:
            return
        self._started = False
        self._closing = True  # our own disconnect is not a lost connection: no warning
        if self._connected.is_set():
            # A clean disconnect suppresses the last will: say offline ourselves.
            info = self._client.publish(self.availability, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout / 2)
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        # loop_stop joins paho's thread without a timeout; a connect stuck on a dead network
        # must not hold up shutdown, so the join happens beside us, bounded.
        stopper = threading.Thread(target=self._client.loop_stop, name="mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(timeout / 2)
        self._connected.clear()


def make_publisher(settings: Settings, thing: str) -> Publisher:
    """The publisher ``--iot`` asks for; ``auto`` falls back from greengrass with a log line."""
    mode = settings.iot
    if mode == "off":
        return NullPublisher()
    if mode in ("auto", "greengrass"):
        try:
            return GreengrassPublisher()
        except Exception as exc:  # ModuleNotFoundError('greengrass_common') outside a core
            reason = f"{type(exc).__name__}: {exc}"
            if mode == "greengrass":
                raise OutputError("--iot", f"greengrass needs a Greengrass core ({reason})") from None
            log.info(
                "IoT: not inside a Greengrass core (%s); publishing %s instead", reason,
                f"to MQTT {settings.mqtt}" if settings.mqtt
                else "to the log at debug level (give --mqtt URL for a broker)",
            )
    if mode == "mqtt" or (mode == "auto" and settings.mqtt):
        if not settings.mqtt:
            raise OutputError("--mqtt", "--iot mqtt needs a broker: --mqtt mqtt://HOST[:PORT]")
        return MqttPublisher(settings.mqtt, thing, settings.mqtt_ca, settings.mqtt_cert,
                             settings.mqtt_key, nice=settings.serving_nice)
    return LogPublisher(logging.INFO if mode == "log" else logging.DEBUG)


# -- the output ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    item: Published | None = None  # an inference to publish
    text: str | None = None  # or a status line, as the seed's 'Loading ... model'
    error: str | None = None  # or an error, sent as the seed's 'Error in ...: <error>'


class IotOutput:
    name = "iot"

    def __init__(
        self,
        settings: Settings,
        hub: FrameHub,
        publisher: Publisher,
        thing: str | None = None,
        queue_size: int = QUEUE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hub = hub
        self._clock = clock  # the rate limit's clock; tests pass their own
        self.publisher = publisher
        self.thing = thing or resolve_thing_name(settings)
        self.topic = infer_topic(self.thing)
        self.queue_size = queue_size
        self._model_name = settings.model
        self.nice = settings.serving_nice  # added to the publisher thread's nice value
        self.thread_nice: int | None = None
        self._payload_mode = settings.iot_payload
        self._max_rate = settings.iot_max_rate
        self._on_change = settings.iot_on_change
        self._cond = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_MESSAGES)
        self._stop = threading.Event()
        self._drain_until = 0.0
        self._thread: threading.Thread | None = None
        self._rl = RateLimitedLog(log)
        self._announced_model: str | None = None
        self._loading_announced = False
        self._error_sent: dict[str, float] = {}
        self._last_labels: frozenset[str] | None = None
        self._last_sent = -1e9
        self._last_ok = True
        self.sent = 0
        self.dropped_queue = 0
        self.dropped_offline = 0
        self.queued_offline = 0
        self.errors = 0
        self.refused_too_large = 0
        self.skipped_rate = 0
        self.skipped_unchanged = 0
        self.status_messages = 0
        self.last_error: str | None = None

    # -- Output --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self.publisher.start()
        self.announce_loading()
        self.hub.add_listener(self._on_hub)
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="iot-publisher", daemon=True
        )
        self._thread.start()
        log.info("IoT: publishing to %s via %s", self.topic, self.publisher.name)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop within ``timeout``, sending what is queued first: the status lines and the latest
        result (older queued results are dropped and counted, so the last one always has time)."""
        self.hub.remove_listener(self._on_hub)
        with self._cond:
            self._drain_until = time.monotonic() + timeout / 2 * 0.9
            items = [job for job in self._queue if job.item is not None]
            if len(items) > 1:
                last = items[-1]
                self._queue = collections.deque(
                    job for job in self._queue if job.item is None or job is last)
                self.dropped_queue += len(items) - 1
            self._stop.set()
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout / 2)
            if thread.is_alive():
                log.warning("IoT publisher still busy after %.1f s (a blocking publish?)", timeout / 2)
        self.publisher.close(timeout / 2)

    def health(self) -> tuple[bool, str]:
        ok, description = self.publisher.status()
        if not ok:
            return False, f"{self.publisher.name}: {description}"
        if not self._last_ok and self.last_error:
            return False, f"{self.publisher.name}: last publish failed: {self.last_error}"
        return True, (
            f"{self.publisher.name} -> {self.topic}: {self.sent} sent, "
            f"{self.dropped_queue + self.dropped_offline} dropped, {self.errors} errors"
        )

    def stats(self) -> dict[str, Any]:
        ok, description = self.publisher.status()
        return {
            "publisher": self.publisher.name,
            "topic": self.topic,
            "thing": self.thing,
            "connected": ok,
            "status": description,
            "payload": self._payload_mode,
            "max_rate": self._max_rate,
            "on_change": self._on_change,
            "sent": self.sent,
            "status_messages": self.status_messages,
            "dropped_queue": self.dropped_queue,
            "dropped_offline": self.dropped_offline,
            "queued_offline": self.queued_offline,
            "errors": self.errors,
            "refused_too_large": self.refused_too_large,
            "skipped_rate": self.skipped_rate,
            "skipped_unchanged": self.skipped_unchanged,
            "queue": len(self._queue),
            "queue_size": self.queue_size,
            "last_error": self.last_error,
            "thread_nice": self.thread_nice,
            "network_thread_nice": getattr(self.publisher, "thread_nice", None),
        }

    def apply(self, settings: Settings) -> None:
        self._payload_mode = settings.iot_payload
        self._max_rate = settings.iot_max_rate
        self._on_change = settings.iot_on_change
        self._model_name = settings.model

    # -- for the control page and the Lambda ---------------------------------------------------
    def recent_messages(self) -> list[dict[str, Any]]:
        """The last messages, oldest first: time, topic, payload text, size and status."""
        with self._cond:
            return [dict(m) for m in self._recent]

    def status(self, text: str) -> None:
        """Queue a plain-text status line on the topic, as the seed's 'Cat-Dog model loaded'."""
        self._put(_Job(text=text))

    def announce_loading(self) -> None:
        """The seed's 'Loading ... model' line, once; the Lambda calls it before loading."""
        if not self._loading_announced:
            self._loading_announced = True
            self.status(f"Loading {self._display_model_name()} model")

    def report_error(self, error: str) -> None:
        """Queue the seed's ``Error in ...: <error>``; the same text as a frame's error (e.g.
        'model not loaded: ...') goes out once, not once from here and once per frame."""
        self._put(_Job(error=error))

    # -- the loop's side: hand off only ----------------------------------------------------------
    def _on_hub(self, seq: int) -> None:
        if seq < 0:
            return  # the hub closed
        item = self.hub.latest()
        if item is not None and item.seq == seq:
            self._put(_Job(item=item))

    def _put(self, job: _Job) -> None:
        with self._cond:
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                self.dropped_queue += 1
            self._queue.append(job)
            self._cond.notify()

    # -- the publisher thread ------------------------------------------------------------------
    def _run(self, stop: threading.Event) -> None:
        self.thread_nice = serving_thread(self.nice)
        while True:
            with self._cond:
                if not self._queue and not stop.is_set():
                    self._cond.wait(0.5)
                if stop.is_set() and (not self._queue or time.monotonic() > self._drain_until):
                    return  # drained, or out of time
                job = self._queue.popleft() if self._queue else None
            if job is None:
                continue
            try:
                if job.item is not None:
                    self._handle(job.item)
                elif job.text is not None:
                    self._send(job.text.encode("utf-8"), status=True)
                elif job.error is not None:
                    self._report_error(job.error)
            except Exception as exc:  # nothing a message does may end the publisher
                self.errors += 1
                self.last_error = str(exc) or type(exc).__name__
                log.exception("IoT publisher error")

    def _handle(self, item: Published) -> None:
        result = item.result
        if result.model is not None and result.model.name != self._announced_model:
            self._announced_model = result.model.name
            self._send(f"{result.model.name} model loaded".encode(), status=True)
        if result.error:
            # No inference happened (model not loaded, model error, no frame): say so the seed's
            # way, once per distinct error and then at most every ERROR_REPEAT_SECONDS.
            self._report_error(result.error)
            return
        payload = result.payload()
        labels = frozenset(payload)
        if self._on_change and labels == self._last_labels:
            self.skipped_unchanged += 1
            return
        now = self._clock()
        if self._max_rate > 0 and now - self._last_sent < 1.0 / self._max_rate:
            self.skipped_rate += 1
            return
        body = result.to_json() if self._payload_mode == "rich" else payload
        self._last_sent = now
        if self._send(json.dumps(body).encode("utf-8")):
            self._last_labels = labels

    def _report_error(self, error: str) -> None:
        now = self._clock()
        if now - self._error_sent.get(error, -1e9) < ERROR_REPEAT_SECONDS:
            return
        if len(self._error_sent) > 100:
            self._error_sent.clear()
        self._error_sent[error] = now
        self._send(f"Error in {SOURCE_NAME}: {error}".encode(), status=True)

    def _send(self, payload: bytes, status: bool = False) -> bool:
        if status:
            self.status_messages += 1
        if len(payload) > MAX_MESSAGE_BYTES:
            self.refused_too_large += 1
            outcome = f"refused: {len(payload)} bytes is over the {MAX_MESSAGE_BYTES // 1024} KB IoT limit"
            self._rl(logging.WARNING, "IoT message %s", outcome, key="too-large")
            self._remember(payload, outcome)
            return False
        try:
            sent_now = self.publisher.publish(self.topic, payload, important=status)
        except PublishOffline as exc:
            self.dropped_offline += 1
            self._remember(payload, f"dropped: {exc}")
            return False
        except Exception as exc:  # InvocationException, socket errors: counted, logged, survived
            self.errors += 1
            self._last_ok = False
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._rl(logging.WARNING, "IoT publish via %s failed: %s", self.publisher.name,
                     self.last_error, key="publish-error")
            self._remember(payload, f"error: {self.last_error}")
            return False
        self._last_ok = True
        if not sent_now:
            self.queued_offline += 1
            self._remember(payload, "queued until connected")
            return True
        self.sent += 1
        self._remember(payload, "sent")
        return True

    def _remember(self, payload: bytes, outcome: str) -> None:
        text = payload[:2048].decode("utf-8", errors="replace")
        entry = {"time": time.time(), "topic": self.topic, "payload": text, "bytes": len(payload),
                 "status": outcome}
        with self._cond:
            self._recent.append(entry)

    def _display_model_name(self) -> str:
        if self._model_name:
            return Path(self._model_name).stem if "/" in self._model_name else self._model_name
        from inference.models import default_model

        name = default_model()
        return Path(name).stem if "/" in name else name
