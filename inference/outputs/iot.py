"""IotOutput: every inference on the IoT topic, as the seed's ``client.publish`` did, without ever
holding up the loop, and without losing messages to a short broker outage.

Topic ``--iot-topic`` (default the seed's ``$aws/things/<thing>/infer``); payload by default
exactly the seed's ``json.dumps({label_name: prob, ...})``, at most one a second by default
(``--iot-max-rate``; 0 = one per inference, as the seed) and none when nothing passes the
threshold (``--iot-send-empty`` for the seed's ``{}``). The loop
only hands each new hub item to a small queue (a hub listener: O(1), no I/O); the named thread
``iot-publisher`` builds the payloads into an outbox and sends them in order. While the broker is
away the outbox keeps up to ``--iot-queue`` messages (the oldest dropped first, counted) and they
go out, in order, when it is back.

A listener rather than ``hub.wait_newer``: a waiter scheduled late skips frames silently, while
the seed's contract is one message per inference; with the listener every inference is either
published, filtered (rate limit, on-change) or counted as dropped.

Publishers (``--iot``): ``greengrass`` (``greengrasssdk.client('iot-data')``, only inside a
Greengrass core), ``mqtt`` (paho-mqtt 2.x to AWS IoT Core or any broker: TLS with a client
certificate, ALPN for port 443, user and password), ``log`` (JSON lines) and ``off``. ``auto``
tries greengrass, then mqtt when ``--mqtt`` is given, else log.

MQTT availability goes to ``deeplens/<thing>/availability`` (retained ``online`` on connect, a
retained last will ``offline``), not under ``$aws/``: AWS IoT Core reserves topics starting with
``$`` for its own services and refuses arbitrary publishes (and retained messages) there.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from typing_extensions import Protocol

from inference.affinity import serving_thread
from inference.logutil import RateLimitedLog
from inference.models.catalog import display_name
from inference.outputs.base import OutputError
from inference.pipeline.frames import Frame, FrameHub
from inference.settings import Settings, redact_url
from inference.workers import Worker, remaining

log = logging.getLogger(__name__)
message_log = logging.getLogger("inference.iot.messages")

MAX_MESSAGE_BYTES = 128 * 1024  # the AWS IoT message size limit
QUEUE_SIZE = 64  # inferences handed over by the loop and not yet turned into messages
IN_FLIGHT = 20  # MQTT messages sent and not yet acknowledged (paho's own default window)
RECENT_MESSAGES = 20
ERROR_REPEAT_SECONDS = 60.0  # the same error goes out again at most this often
SOURCE_NAME = "deeplens-dashboard"
DEFAULT_TOPIC = "$aws/things/{thing}/infer"
AVAILABILITY_TOPIC = "deeplens/{thing}/availability"
EVENTS_TOPIC = "deeplens/{thing}/events"
AWS_IOT_ALPN = "x-amzn-mqtt-ca"


def resolve_thing_name(settings: Settings, env: Mapping[str, str] | None = None) -> str:
    """``--thing-name``, else ``$AWS_IOT_THING_NAME`` (set on the device), else deeplens-<host>."""
    env = os.environ if env is None else env
    name = settings.thing_name or env.get("AWS_IOT_THING_NAME", "").strip()
    if not name:
        name = f"deeplens-{socket.gethostname().split('.')[0] or 'host'}"
    if any(ch in name for ch in "+#\0/") or len(name) > 128:
        raise OutputError("--thing-name", f"{name!r} cannot be part of an MQTT topic")
    return name


def infer_topic(thing: str, template: str = DEFAULT_TOPIC) -> str:
    return template.replace("{thing}", thing)


def events_topic(thing: str) -> str:
    """Event notices (new, update, end), beside the availability topic and for the same reason:
    a device cannot publish under ``$aws/`` on AWS IoT Core."""
    return EVENTS_TOPIC.replace("{thing}", thing)


def availability_topic(thing: str) -> str:
    return AVAILABILITY_TOPIC.format(thing=thing)


class PublishOffline(Exception):
    """The publisher cannot take a message now (no connection); the caller keeps it."""


class Publisher(Protocol):
    name: str

    def start(self) -> None: ...

    def wait_ready(self, timeout: float) -> bool:
        """True once a message can be handed over now; False after ``timeout``."""
        ...

    def publish(self, topic: str, payload: bytes) -> None:
        """Hand one message over. Raises PublishOffline when there is no connection (the
        message was not taken); any other exception is a failed message."""
        ...

    def status(self) -> tuple[bool, str]: ...

    def close(self, deadline: float) -> None: ...


# -- publishers ----------------------------------------------------------------------------------
class _Immediate:
    """A publisher that is always ready: every publish completes in the call."""

    def start(self) -> None:
        pass

    def wait_ready(self, timeout: float) -> bool:
        return True

    def close(self, deadline: float) -> None:
        pass


class GreengrassPublisher(_Immediate):
    """The seed's path: the Greengrass core's local IPC. Creating it outside a core raises
    ``ModuleNotFoundError: greengrass_common``, which ``make_publisher`` turns into a fallback."""

    name = "greengrass"

    def __init__(self) -> None:
        import greengrasssdk

        self._client = greengrasssdk.client("iot-data")

    def publish(self, topic: str, payload: bytes) -> None:
        # bytes: a str payload breaks the SDK's IPC call under Python 3.
        self._client.publish(topic=topic, payload=payload)

    def status(self) -> tuple[bool, str]:
        return True, "Greengrass core IPC"


class LogPublisher(_Immediate):
    """Each message as one JSON line on the ``inference.iot.messages`` logger.

    Asked for (``--iot log``) the lines come at INFO; as the quiet fallback of ``auto`` they come
    at DEBUG, so a default run's terminal is not flooded at the frame rate (the control page
    still shows the last messages)."""

    name = "log"

    def __init__(self, level: int = logging.INFO) -> None:
        self.level = level

    def publish(self, topic: str, payload: bytes) -> None:
        text = payload.decode("utf-8", errors="replace")
        message_log.log(self.level, "%s", json.dumps({"topic": topic, "payload": text}))

    def status(self) -> tuple[bool, str]:
        return True, "JSON lines in the log"


class NullPublisher(_Immediate):
    name = "off"

    def publish(self, topic: str, payload: bytes) -> None:
        pass

    def status(self) -> tuple[bool, str]:
        return True, "off"


@dataclass(frozen=True)
class MqttTarget:
    """Where and how to connect, from ``--mqtt`` and the options beside it."""

    tls: bool
    host: str
    port: int
    username: str = ""
    password: str = ""

    @property
    def url(self) -> str:
        """The broker without the login, fit for logs."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_target(url: str, username: str = "", password: str = "") -> MqttTarget:
    """``mqtt[s]://[USER[:PASSWORD]@]HOST[:PORT]``; ``username``/``password`` win over the URL's."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or port == 0 or port == -1:
        raise OutputError("--mqtt", "expected mqtt://[USER[:PASSWORD]@]HOST[:PORT] or mqtts://..., "
                          f"got a {parts.scheme or 'schemeless'} URL")
    tls = parts.scheme == "mqtts"
    return MqttTarget(
        tls=tls, host=parts.hostname, port=port or (8883 if tls else 1883),
        username=username or urllib.parse.unquote(parts.username or ""),
        password=password or urllib.parse.unquote(parts.password or ""),
    )


def alpn_protocols(setting: str, target: MqttTarget) -> list[str]:
    """``--mqtt-alpn``: auto gives AWS IoT Core's ``x-amzn-mqtt-ca`` on port 443 (the only way it
    accepts MQTT with a client certificate there), nothing elsewhere."""
    if not target.tls or setting == "off":
        return []
    if setting == "auto":
        return [AWS_IOT_ALPN] if target.port == 443 else []
    return [p for p in setting.split(",") if p]


def tls_context(ca: str, cert: str, key: str, alpn: list[str]) -> ssl.SSLContext:
    for option, path in (("--mqtt-ca", ca), ("--mqtt-cert", cert), ("--mqtt-key", key)):
        if path and not Path(path).is_file():
            raise OutputError(option, f"file not found: {path}")
    if bool(cert) != bool(key):
        raise OutputError("--mqtt-cert", "--mqtt-cert and --mqtt-key go together")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
        if cert:
            context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:  # bad PEM, a key that does not match
        option = "--mqtt-cert" if cert else "--mqtt-ca"
        raise OutputError(option, f"TLS set-up failed: {exc}") from None
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


class MqttPublisher:
    """paho-mqtt 2.x in its own network thread (``loop_start``). ``connect_async`` makes a broker
    that is down at start a non-event; paho reconnects with exponential backoff.

    Messages go out at QoS 1: a message on the wire when the connection dies is sent again on
    reconnect (paho keeps it), so an outage loses nothing that was handed over. At most
    ``IN_FLIGHT`` wait for their acknowledgement; the output's outbox holds the rest, bounded.
    Availability goes at QoS 1, retained."""

    name = "mqtt"

    def __init__(
        self,
        url: str,
        thing: str,
        ca: str = "",
        cert: str = "",
        key: str = "",
        client_id: str = "",
        username: str = "",
        password: str = "",
        alpn: str = "auto",
        min_delay: int = 1,
        max_delay: int = 30,
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
        target = parse_target(url, username, password)
        self.target = target
        self.url = target.url
        self.availability = availability_topic(thing)
        # AWS IoT Core policies usually tie the client id to the thing name.
        self.client_id = client_id or thing
        self.alpn = alpn_protocols(alpn, target)
        self._connected = threading.Event()
        self._progress = threading.Event()  # an ack, a connect or a disconnect: look again
        self._in_flight: list[Any] = []  # MQTTMessageInfo of messages not yet acknowledged
        self._started = False
        self._closing = False
        self._last_reason = "not connected yet"
        self._refused: str | None = None  # the broker's reason while it refuses our login
        self._logged: set[str] = set()  # outage and refusal lines already logged, once each
        self.connects = 0
        self.disconnects = 0
        self.refusals = 0
        self.handed = 0  # messages given to paho; acknowledged = handed - in flight

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id)
        if target.tls:
            client.tls_set_context(tls_context(ca, cert, key, self.alpn))
        elif ca or cert or key:
            log.warning("--mqtt-ca/--mqtt-cert/--mqtt-key are ignored for %s (use mqtts://)", self.url)
        if target.username:
            client.username_pw_set(target.username, target.password or None)
        elif target.password:
            raise OutputError("--mqtt-username", "a password needs a user name")
        client.will_set(self.availability, "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=min_delay, max_delay=max_delay)
        client.max_inflight_messages_set(IN_FLIGHT)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client

    def _lower_network_thread(self) -> None:
        # Called on paho's network thread (its callbacks run there); it writes every message.
        if self.thread_nice is None:
            self.thread_nice = serving_thread(self.nice)

    def _once(self, key: str, level: int, message: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, message, *args)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._lower_network_thread()
        self._progress.set()
        if getattr(reason, "is_failure", False):
            self.refusals += 1
            self._refused = str(reason)
            self._last_reason = f"login refused: {reason}"
            self._once(f"refused:{reason}", logging.WARNING,
                       "MQTT %s refused the connection: %s (check --mqtt-username, the password, "
                       "the client id %r and the broker's access rules); retrying with backoff",
                       self.url, reason, self.client_id)
            return
        self.connects += 1
        self._refused = None
        self._logged.clear()
        self._connected.set()
        self._last_reason = "connected"
        client.publish(self.availability, "online", qos=1, retain=True)
        log.info("MQTT connected to %s as %r (availability on %s)", self.url, self.client_id,
                 self.availability)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._lower_network_thread()
        self._progress.set()
        if self._refused is None:
            self._last_reason = "broker unreachable; retrying with backoff"
        # Once per outage: a broker that stays away must not fill the log.
        self._once("unreachable", logging.WARNING, "MQTT broker %s unreachable; retrying with backoff",
                   self.url)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._progress.set()
        if self._closing:
            self._last_reason = "closed"
            log.info("MQTT disconnected from %s", self.url)
            return
        if self._refused is not None:
            return  # the refusal is the reason; paho's disconnect after it adds nothing
        self._last_reason = f"disconnected ({reason}); reconnecting"
        if was:
            self.disconnects += 1
            log.warning("MQTT connection to %s lost (%s); reconnecting with backoff", self.url, reason)

    def _on_publish(self, client: Any, userdata: Any, mid: Any, reason: Any, properties: Any) -> None:
        self._progress.set()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def in_flight(self) -> int:
        return sum(1 for info in tuple(self._in_flight) if not info.is_published())

    @property
    def acked(self) -> int:
        return self.handed - self.in_flight

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._closing = False
        self._client.connect_async(self.target.host, self.target.port, keepalive=30)
        self._client.loop_start()
        log.info("MQTT publishing to %s as %r%s", self.url, self.client_id,
                 f" (ALPN {','.join(self.alpn)})" if self.alpn else "")

    def _prune(self) -> None:
        self._in_flight = [info for info in self._in_flight if not info.is_published()]

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._progress.clear()
            self._prune()
            if self._connected.is_set() and len(self._in_flight) < IN_FLIGHT:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._progress.wait(min(remaining, 0.5))

    def publish(self, topic: str, payload: bytes) -> None:
        mqtt = self._mqtt
        if not self._connected.is_set():
            raise PublishOffline(f"not connected to {self.url}")
        info = self._client.publish(topic, payload, qos=1)
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            # paho keeps a QoS 1 message it could not send and sends it on reconnect: it was taken.
            pass
        elif info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"MQTT publish failed: {mqtt.error_string(info.rc)}")
        self._in_flight.append(info)
        self.handed += 1

    def status(self) -> tuple[bool, str]:
        if self._connected.is_set():
            return True, f"connected to {self.url}"
        return False, f"{self.url}: {self._last_reason}"

    def close(self, deadline: float) -> None:
        if not self._started:
            return
        self._started = False
        if self._connected.is_set():
            # What was handed over gets its chance to be acknowledged, leaving time to say
            # offline: a clean disconnect suppresses the last will.
            while self._connected.is_set() and remaining(deadline) > 0.5:
                self._progress.clear()
                self._prune()
                if not self._in_flight:
                    break
                self._progress.wait(min(0.1, remaining(deadline) - 0.5))
            info = self._client.publish(self.availability, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.0, remaining(deadline) - 0.2))
            except (RuntimeError, ValueError):
                pass
        self._closing = True  # our own disconnect is not a lost connection: no warning
        self._client.disconnect()
        # loop_stop joins paho's thread without a timeout; a connect stuck on a dead network
        # must not hold up shutdown, so the join happens beside us, bounded.
        stopper = threading.Thread(target=self._client.loop_stop, name="mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(max(0.1, remaining(deadline)))
        self._connected.clear()


def read_password(settings: Settings) -> str:
    """``--mqtt-password``, else the first line of ``--mqtt-password-file``."""
    if settings.mqtt_password or not settings.mqtt_password_file:
        return settings.mqtt_password
    path = settings.mqtt_password_file
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise OutputError("--mqtt-password-file", f"cannot read {path}: {exc}") from None


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
                f"to MQTT {redact_url(settings.mqtt)}" if settings.mqtt
                else "to the log at debug level (give --mqtt URL for a broker)",
            )
    if mode == "mqtt" or (mode == "auto" and settings.mqtt):
        if not settings.mqtt:
            raise OutputError("--mqtt", "--iot mqtt needs a broker: --mqtt mqtt://HOST[:PORT]")
        return MqttPublisher(
            settings.mqtt, thing, settings.mqtt_ca, settings.mqtt_cert, settings.mqtt_key,
            client_id=settings.mqtt_client_id, username=settings.mqtt_username,
            password=read_password(settings), alpn=settings.mqtt_alpn, nice=settings.serving_nice,
        )
    return LogPublisher(logging.INFO if mode == "log" else logging.DEBUG)


# -- the output ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    item: Frame | None = None  # an inference to publish
    text: str | None = None  # or a status line, as the seed's 'Loading ... model'
    error: str | None = None  # or an error, sent as the seed's 'Error in ...: <error>'
    notice: bytes | None = None  # or an event notice, on the events topic


@dataclass(frozen=True)
class _Message:
    payload: bytes
    status: bool  # a status line or an error rather than an inference
    topic: str | None = None  # None: the results topic


class Outbox:
    """Messages made and not yet handed to the publisher, oldest first: the backlog of an outage,
    at most ``size``. Only the publisher thread changes it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._messages: collections.deque[_Message] = collections.deque()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._messages)

    def add(self, message: _Message) -> _Message | None:
        """Append ``message``; the oldest one dropped to make room, if any."""
        dropped = None
        if len(self._messages) >= self.size:
            dropped = self._messages.popleft()
            self.dropped += 1
        self._messages.append(message)
        return dropped

    def head(self) -> _Message:
        return self._messages[0]

    def pop_head(self) -> None:
        self._messages.popleft()

    def keep_the_latest_result(self) -> None:
        """The status lines and the newest result only: what a stop has time to send."""
        results = [m for m in self._messages if not m.status]
        if len(results) > 1:
            last = results[-1]
            self._messages = collections.deque(m for m in self._messages if m.status or m is last)
            self.dropped += len(results) - 1


class Composer:
    """What goes on the topic for each inference and status, as the seed said it: ``{label: prob}``
    (or the rich result), "<model> model loaded" once per model, "Error in ...: <error>" once per
    distinct error and then at most every ERROR_REPEAT_SECONDS; thinned out by --iot-max-rate and
    --iot-on-change, and nothing (not ``{}``) when no result passes the threshold unless
    --iot-send-empty.

    The rate limit keeps the newest result it held back (``held``) and sends it once its turn
    comes (:meth:`due`) or at stop: a subscriber always ends up with the latest result, also
    when the loop pauses or stops right after a burst."""

    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.apply(settings)
        self._announced_model: str | None = None
        self._error_sent: dict[str, float] = {}
        self._last_labels: frozenset[str] | None = None
        self._last_sent = -1e9
        self.skipped_rate = 0
        self.skipped_unchanged = 0
        self.skipped_empty = 0
        self.composed_seq = 0  # the last inference looked at
        self.held: Frame | None = None

    def apply(self, settings: Settings) -> None:
        self.payload_mode = settings.iot_payload
        self.max_rate = settings.iot_max_rate
        self.send_empty = settings.iot_send_empty
        self.on_change = settings.iot_on_change
        self.model_name = settings.model

    def inference(self, item: Frame, force: bool = False) -> list[_Message]:
        """The messages for ``item``; ``force``: past the rate limit (a held result's turn)."""
        result = item.result
        self.composed_seq = max(self.composed_seq, item.seq)
        out: list[_Message] = []
        if result.model is not None and result.model.name != self._announced_model:
            self._announced_model = result.model.name
            out.append(_Message(f"{result.model.name} model loaded".encode(), True))
        if result.error:
            # No inference happened (model not loaded, model error, no frame): say so.
            return out + self.error(result.error)
        payload = result.payload()
        if not payload and not self.send_empty:
            # An empty {} per frame says nothing a subscriber can use, at the price of a message.
            self.skipped_empty += 1
            self._drop_held()  # newer than it: what it showed is gone
            return out
        labels = frozenset(payload)
        if self.on_change and labels == self._last_labels:
            self.skipped_unchanged += 1
            return out
        now = self._clock()
        if not force and self.max_rate > 0 and now - self._last_sent < 1.0 / self.max_rate:
            self._drop_held()
            self.held = item
            return out
        self.held = None
        self._last_sent, self._last_labels = now, labels
        body = result.to_json() if self.payload_mode == "rich" else payload
        return out + [_Message(json.dumps(body).encode("utf-8"), False)]

    def _drop_held(self) -> None:
        if self.held is not None:
            self.held = None
            self.skipped_rate += 1

    def due(self, force: bool = False) -> list[_Message]:
        """The held result's message once its turn has come (``force``: now, at stop)."""
        item = self.held
        if item is None:
            return []
        if not force and self.max_rate > 0 and self._clock() - self._last_sent < 1.0 / self.max_rate:
            return []
        self.held = None
        return self.inference(item, force=True)

    def error(self, error: str) -> list[_Message]:
        now = self._clock()
        if now - self._error_sent.get(error, -1e9) < ERROR_REPEAT_SECONDS:
            return []
        if len(self._error_sent) > 100:
            self._error_sent.clear()
        self._error_sent[error] = now
        return [_Message(f"Error in {SOURCE_NAME}: {error}".encode(), True)]


class IotOutput(Worker):
    name = "iot"  # its key in /health, /api/stats and /metrics
    thread_name = "iot-publisher"
    serving = True

    @classmethod
    def build(cls, settings: Settings, hub: FrameHub) -> IotOutput:
        thing = resolve_thing_name(settings)
        return cls(settings, hub, make_publisher(settings, thing), thing)

    def __init__(
        self,
        settings: Settings,
        hub: FrameHub,
        publisher: Publisher,
        thing: str | None = None,
        queue_size: int = QUEUE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.hub = hub
        self.composer = Composer(settings, clock)  # clock: the rate limit's; tests pass their own
        self.publisher = publisher
        self.thing = thing or resolve_thing_name(settings)
        self.topic = infer_topic(self.thing, settings.iot_topic)
        self.events_topic = events_topic(self.thing)
        self.notices = 0
        self.queue_size = queue_size
        self.backlog_size = settings.iot_queue
        self.nice = settings.serving_nice  # added to the publisher thread's nice value
        self._cond = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()
        self._outbox = Outbox(settings.iot_queue)
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_MESSAGES)
        self._drain_until = 0.0
        self._rl = RateLimitedLog(log)
        self._loading_announced = False
        self._last_ok = True
        self.sent = 0
        self.dropped_queue = 0
        self.errors = 0
        self.refused_too_large = 0
        self.status_messages = 0
        self.last_error: str | None = None

    # -- Output --------------------------------------------------------------------------------
    def start(self) -> None:
        if self.alive:
            return
        self.publisher.start()
        self.announce_loading()
        self.hub.add_listener(self._on_hub)
        super().start()
        log.info("IoT: publishing to %s via %s", self.topic, self.publisher.name)

    def stop(self, deadline: float) -> bool:
        """Stop by ``deadline``, sending the status lines and the latest result first (older
        results still waiting are dropped and counted, so the last one always has time); the
        second half of the time is the publisher's, to say offline and disconnect."""
        self.hub.remove_listener(self._on_hub)
        with self._cond:
            self._drain_until = time.monotonic() + remaining(deadline) / 2
            items = [job for job in self._queue if job.item is not None]
            if len(items) > 1:
                last = items[-1]
                self._queue = collections.deque(
                    job for job in self._queue if job.item is None or job is last)
                self.dropped_queue += len(items) - 1
            self.stopping.set()
            self._cond.notify_all()
        stopped = self.join(self._drain_until + 0.1)
        unsent = len(self._outbox)
        if unsent:
            log.warning("IoT: %d messages not sent at stop (%s)", unsent, self.publisher.status()[1])
        self.publisher.close(deadline)
        return stopped

    def health(self) -> tuple[bool, str]:
        ok, description = self.publisher.status()
        backlog = self.backlog
        waiting = f" ({backlog} messages waiting, {self._outbox.dropped} dropped)" if backlog else ""
        if not ok:
            return False, f"{self.publisher.name}: {description}{waiting}"
        if not self._last_ok and self.last_error:
            return False, f"{self.publisher.name}: last publish failed: {self.last_error}"
        return True, (
            f"{self.publisher.name} -> {self.topic}: {self.sent} sent, "
            f"{self.dropped_queue + self._outbox.dropped} dropped, {self.errors} errors{waiting}"
        )

    @property
    def backlog(self) -> int:
        return len(self._outbox)

    def stats(self) -> dict[str, Any]:
        ok, description = self.publisher.status()
        publisher = self.publisher
        return {
            "publisher": publisher.name,
            "topic": self.topic,
            "events_topic": self.events_topic,
            "notices": self.notices,
            "thing": self.thing,
            "connected": ok,
            "status": description,
            "payload": self.composer.payload_mode,
            "max_rate": self.composer.max_rate,
            "on_change": self.composer.on_change,
            "sent": self.sent,
            "acknowledged": getattr(publisher, "acked", self.sent),
            "in_flight": getattr(publisher, "in_flight", 0),
            "status_messages": self.status_messages,
            "backlog": self.backlog,
            "backlog_size": self.backlog_size,
            "dropped_backlog": self._outbox.dropped,
            "dropped_queue": self.dropped_queue,
            "errors": self.errors,
            "refused_too_large": self.refused_too_large,
            "skipped_rate": self.composer.skipped_rate,
            "skipped_unchanged": self.composer.skipped_unchanged,
            "skipped_empty": self.composer.skipped_empty,
            "send_empty": self.composer.send_empty,
            "held": self.composer.held is not None,
            "composed": self.composer.composed_seq,
            "queue": len(self._queue),
            "queue_size": self.queue_size,
            "last_error": self.last_error,
            "thread_nice": self.thread_nice,
            "network_thread_nice": getattr(publisher, "thread_nice", None),
        }

    def apply(self, settings: Settings) -> None:
        self.composer.apply(settings)

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
            self.status(f"Loading {display_name(self.composer.model_name)} model")

    def notice(self, payload: Mapping[str, Any]) -> None:
        """Queue an event notice (``{"type": "new"|"update"|"end", "before", "after"}``) for
        :attr:`events_topic`; notices are not rate-limited, and wait in the backlog like results."""
        self._put(_Job(notice=json.dumps(payload).encode("utf-8")))

    def notify(self, kind: str, payload: Mapping[str, Any]) -> None:
        """A recorder listener: every event notice goes out (:meth:`notice`)."""
        self.notice(payload)

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
    def run(self) -> None:
        stop = self.stopping
        while True:
            with self._cond:
                if not self._queue and not stop.is_set():
                    # With a backlog or a held result, look again soon; else wait for work.
                    self._cond.wait(0.1 if self._outbox or self.composer.held else 0.5)
                if stop.is_set() and time.monotonic() > self._drain_until:
                    return  # out of time: stop() counts what is left
                jobs = list(self._queue)
                self._queue.clear()
            for job in jobs:
                try:
                    self._make(job)
                except Exception as exc:  # nothing a message does may end the publisher
                    self.errors += 1
                    self.last_error = str(exc) or type(exc).__name__
                    log.exception("IoT publisher error")
            for message in self.composer.due(force=stop.is_set()):
                self._enqueue(message.payload, message.status)
            trimmed = stop.is_set()
            if trimmed:
                self._outbox.keep_the_latest_result()
            self._flush(stop, trimmed)
            if stop.is_set() and not self._queue and not self._outbox:
                return  # drained

    def _flush(self, stop: threading.Event, trimmed: bool) -> None:
        """Hand the outbox to the publisher in order while it takes messages; back to the run
        loop for new work, and at stop for the trim first."""
        while self._outbox:
            if stop.is_set() and (not trimmed or time.monotonic() > self._drain_until):
                return
            if not self.publisher.wait_ready(0.05):
                return  # no connection, or the window is full: the run loop comes back
            if self._queue:
                return  # new work first: its messages join the outbox behind these
            message = self._outbox.head()
            try:
                self.publisher.publish(message.topic or self.topic, message.payload)
            except PublishOffline:
                return  # kept at the head; the next pass tries again
            except Exception as exc:  # InvocationException, socket errors: counted, logged, survived
                self._outbox.pop_head()
                self.errors += 1
                self._last_ok = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._rl(logging.WARNING, "IoT publish via %s failed: %s", self.publisher.name,
                         self.last_error, key="publish-error")
                self._remember(message.payload, f"error: {self.last_error}", message.topic)
                continue
            self._outbox.pop_head()
            self._last_ok = True
            self.sent += 1
            self._remember(message.payload, "sent", message.topic)

    def _make(self, job: _Job) -> None:
        if job.item is not None:
            messages = self.composer.inference(job.item)
        elif job.error is not None:
            messages = self.composer.error(job.error)
        elif job.notice is not None:
            self.notices += 1
            messages = [_Message(job.notice, True, self.events_topic)]
        else:
            messages = [_Message((job.text or "").encode("utf-8"), True)]
        for message in messages:
            self._enqueue(message.payload, message.status, message.topic)

    def _enqueue(self, payload: bytes, status: bool = False, topic: str | None = None) -> bool:
        if status:
            self.status_messages += 1
        if len(payload) > MAX_MESSAGE_BYTES:
            self.refused_too_large += 1
            outcome = f"refused: {len(payload)} bytes is over the {MAX_MESSAGE_BYTES // 1024} KB IoT limit"
            self._rl(logging.WARNING, "IoT message %s", outcome, key="too-large")
            self._remember(payload, outcome, topic)
            return False
        dropped = self._outbox.add(_Message(payload, status, topic))
        if dropped is not None:
            self._rl(logging.WARNING, "IoT backlog full (%d messages, %s): dropping the oldest",
                     self.backlog_size, self.publisher.status()[1], key="backlog-full")
            self._remember(dropped.payload, "dropped: the backlog was full", dropped.topic)
        return True

    def _remember(self, payload: bytes, outcome: str, topic: str | None = None) -> None:
        text = payload[:2048].decode("utf-8", errors="replace")
        entry = {"time": time.time(), "topic": topic or self.topic, "payload": text,
                 "bytes": len(payload),
                 "status": outcome}
        with self._cond:
            self._recent.append(entry)
