"""Settings: every option of the product, declared once.

One pydantic model. Each field carries its type and range, its help text, its CLI group and
whether it may change while running; its flag (``--top-k``) and environment variable
(``DEEPLENS_TOP_K``) follow from its name. The command line (``app/cli.py``) and the typed body
of ``PATCH /api/config`` are generated from it. Values arrive as text (flags, env, the TOML file)
or JSON (PATCH) and go through the same validation; defaults that depend on the model (a
detector's threshold) are set by one validator, so every entry point gets them.

A bad value raises :class:`ConfigError` naming the field and where the value came from, which
the CLI renders as exit 2 naming the flag (or env var, or file line) and the API as a 422 whose
``loc`` names the field.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, Callable, Dict, Optional, Tuple

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from typing_extensions import Annotated, Literal

from inference.affinity import parse_loop_cpu
from inference.models.catalog import model_type_of

ENV_PREFIX = "DEEPLENS_"
SSD_DEFAULT_THRESHOLD = 0.25
"""The threshold of the DeepLens object- and face-detection samples."""

MQTT_URL = re.compile(r"(mqtts?)://(?:([^@/\s]*)@)?([^@/\s:]+)(?::(\d{1,5}))?/?")


class ConfigError(ValueError):
    """A bad value for one setting. ``field`` is the settings name (``top_k``); ``origin`` says
    where the value came from: ``flag``, ``env``, ``FILE, line N`` or empty (an API body)."""

    def __init__(self, field: str, message: str, origin: str = "") -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.origin = origin

    @property
    def option(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper()

    def __str__(self) -> str:
        if self.origin == "env":
            return f"{self.option} (from {self.env}): {self.message}"
        if self.origin and self.origin != "flag":
            return f"--config: {self.origin}: {self.field}: {self.message}"
        return f"{self.option}: {self.message}"


def opt(default: Any, help: str, *, group: str = "pipeline", live: bool = False,
        metavar: str = "", secret: bool = False, repeatable: bool = False,
        **constraints: Any) -> Any:
    """A settings field: its default, help and range, and how the CLI and API show it."""
    if isinstance(default, float) or (default is None and constraints):
        constraints.setdefault("allow_inf_nan", False)  # nan passes every range check
    extra: Dict[str, Any] = {"group": group, "live": live}
    if metavar:
        extra["metavar"] = metavar
    if secret:
        extra["secret"] = True
    if repeatable:  # the flag may be given several times (argparse append)
        extra["repeatable"] = True
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def redact_url(url: str) -> str:
    """``url`` with the password of its user info masked, for logs and /api/config."""
    return re.sub(r"(://[^:@/\s]*:)[^@/\s]*@", r"\1***@", url)


# -- value types: how text from a flag, an env var or the file becomes a value -----------------------
def _none_if_auto(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("", "auto", "native"):
        return None
    return value


def _numbers(count: int, what: str) -> Callable[[Any], Any]:
    """``"224x224"``, ``"0.5,0.5,0.5"``, ``"0.5"`` or a list -> a tuple of ``count`` numbers."""

    def parse(value: Any) -> Any:
        value = _none_if_auto(value)
        if isinstance(value, str):
            parts = [p for p in re.split(r"[x,\s]+", value.strip().lower()) if p]
            if len(parts) == 1 and count == 3:
                parts *= 3
            if len(parts) != count:
                raise ValueError(f"expected {what}, got {value!r}")
            return tuple(parts)
        return value

    return parse


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):  # True would pass as 1
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _size_range(value: Optional[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
    if value is not None and not all(8 <= n <= 4096 for n in value):
        raise ValueError(f"width and height must be 8..4096, got {value[0]}x{value[1]}")
    return value


def _finite(value: Optional[Tuple[float, ...]]) -> Optional[Tuple[float, ...]]:
    if value is not None and not all(math.isfinite(n) for n in value):
        raise ValueError("must be finite")
    return value


def _nonzero(value: Optional[Tuple[float, ...]]) -> Optional[Tuple[float, ...]]:
    if value is not None and 0.0 in value:
        raise ValueError("must not be 0 (every pixel is divided by it)")
    return value


def _json_object(value: Any) -> Any:
    if isinstance(value, str):
        if not value:
            return {}
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"expected a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {value!r}")
    return value


MIN_SOURCE_FPS = 0.01  # one frame per 100 s; slower, the waits for a frame overflow the clock
MIN_CENTER_CROP = 0.05  # a 20x digital zoom; less leaves no pixel of a small frame to resize
SOURCE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "tcp", "udp", "rtp", "srt")
"""The URL schemes ``--source-schemes`` may allow: FFmpeg's network inputs (not ``file:`` or its
composing protocols such as ``concat:``, which read local files past the source checks)."""


def _floor(least: float, zero_means: str) -> Callable[[Optional[float]], Optional[float]]:
    """0 (which means ``zero_means``) or at least ``least``."""

    def check(value: Optional[float]) -> Optional[float]:
        if value is not None and 0 < value < least:
            raise ValueError(f"must be 0 ({zero_means}) or at least {least:g}, got {value:g}")
        return value

    return check


def _schemes(value: str) -> str:
    text = value.strip().lower()
    if text in ("off", "none"):
        return "off"
    names = [n for n in re.split(r"[,\s]+", text) if n]
    if not names:
        raise ValueError("expected URL schemes separated by commas (rtsp,https) or off")
    unknown = [n for n in names if n not in SOURCE_SCHEMES]
    if unknown:
        raise ValueError(f"unknown scheme {unknown[0]!r}: choose from {', '.join(SOURCE_SCHEMES)}")
    return ",".join(dict.fromkeys(names))


MIN_TOKEN_LENGTH = 16
_HOST_NAME = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


def _token(value: str) -> str:
    # 16 characters of even lowercase letters and digits are 8e24 guesses, out of reach of the
    # login throttle; the generated token has 32. The value is never echoed (a secret).
    if value and len(value) < MIN_TOKEN_LENGTH:
        raise ValueError(f"must be at least {MIN_TOKEN_LENGTH} characters (got {len(value)}): a "
                         "short token is guessed; leave it out for a generated one")
    return value


def _hosts(value: str) -> str:
    if not value or value == "*":
        return value
    hosts = [h.strip().lower() for h in value.split(",")]
    for host in hosts:
        if host != "*" and not _HOST_NAME.fullmatch(host):
            raise ValueError("expected host names or IPv4 addresses separated by commas, without a "
                             f"port (*.example.com for its subdomains, * for any), got {host!r}")
    return ",".join(hosts)


def _mqtt_url(value: str) -> str:
    if not value:
        return value
    match = MQTT_URL.fullmatch(value)
    if not match:
        raise ValueError("expected mqtt://[USER[:PASSWORD]@]HOST[:PORT] or mqtts://..., got "
                         f"{redact_url(value)!r}")
    port = match.group(4)
    if port is not None and not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be 1..65535, got {port}")
    return value


def _topic(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if any(ch in value for ch in "+#\0"):
        raise ValueError(f"a topic to publish to cannot hold the wildcards + or #, got {value!r}")
    if len(value.encode("utf-8")) > 256:
        raise ValueError("longer than 256 bytes (the AWS IoT Core topic limit)")
    return value


def _alpn(value: str) -> str:
    if value.lower() in ("", "auto", "off"):
        return value.lower() or "auto"
    protocols = [p.strip() for p in value.split(",")]
    if not all(protocols) or any(len(p) > 255 or not p.isprintable() for p in protocols):
        raise ValueError(f"expected auto, off or protocol names separated by commas, got {value!r}")
    return ",".join(protocols)


def _rules(value: Any) -> Any:
    """Rules from a flag given several times, an env var or a TOML list; each one checked."""
    from inference.events.rules import RuleError, parse_rule

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected LABEL[:MIN_PROB] rules, got {value!r}")
    rules = []
    for entry in value:
        for text in str(entry).split(","):
            if not text.strip():
                continue
            try:
                rules.append(str(parse_rule(text)))
            except RuleError as exc:
                raise ValueError(str(exc)) from None
    return tuple(rules)


Count = Annotated[int, BeforeValidator(_no_bool)]
Auto = Annotated[Optional[float], BeforeValidator(_none_if_auto)]
Size = Annotated[Optional[Tuple[int, int]], BeforeValidator(_numbers(2, "WxH such as 224x224")),
                 AfterValidator(_size_range)]
Triple = Annotated[Optional[Tuple[float, float, float]],
                   BeforeValidator(_numbers(3, "one or three numbers")), AfterValidator(_finite)]
JsonObject = Annotated[Dict[str, Any], BeforeValidator(_json_object)]
LoopCpu = Annotated[str, AfterValidator(parse_loop_cpu)]
MqttUrl = Annotated[str, AfterValidator(_mqtt_url)]
Topic = Annotated[str, AfterValidator(_topic)]
Alpn = Annotated[str, AfterValidator(_alpn)]
Token = Annotated[str, AfterValidator(_token)]
Hosts = Annotated[str, AfterValidator(_hosts)]
RecordRules = Annotated[Tuple[str, ...], BeforeValidator(_rules)]
Schemes = Annotated[str, AfterValidator(_schemes)]


class Settings(BaseModel):
    """Every option. Frozen: a change makes a new, validated instance (:meth:`changed`)."""

    # protected_namespaces: model_type and model_backend are options, not pydantic's own names.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    # -- source ----------------------------------------------------------------------------------
    source: str = opt("", "frame source: awscam | demo | synthetic[:WxH][@FPS] | a video file | a "
                      "webcam index (0) | an rtsp:// or http:// URL | an image, folder or glob of "
                      "images (default: awscam on a DeepLens, else demo, the bundled bikes.mp4)",
                      live=True, metavar="SOURCE")
    source_schemes: Schemes = opt("rtsp,rtsps,http,https", "URL schemes a network source may "
                                  "have, separated by commas, or off: rtsp, rtsps, rtmp, rtmps, "
                                  "http, https, tcp, udp, rtp, srt (not live: a token holder "
                                  "cannot widen them)", metavar="SCHEMES|off")
    source_fps: Annotated[Auto, AfterValidator(_floor(MIN_SOURCE_FPS, "unpaced"))] = opt(
        None, "pace of the source in frames per second: native (files at their own fps, cameras "
        "as they come, images at 5), or a number; 0 = unpaced, else at least 0.01",
        metavar="FPS|native", ge=0, le=240)
    slide_interval: float = opt(3.0, "seconds each image stays up in an image slideshow",
                                metavar="SECONDS", gt=0, le=86400)
    # -- model -----------------------------------------------------------------------------------
    model: str = opt("", "efficientnet-lite0 | catdog | centerface | an .onnx file | on the device "
                     "an .xml, a Neo folder or an artifact name for mo.optimize (default: "
                     "efficientnet-lite0, on a DeepLens the seed's cat/dog artifact)", live=True,
                     metavar="MODEL")
    model_type: Literal["", "classification", "ssd", "segmentation"] = opt(
        "", "result type of a user model (built-in models know theirs)")
    labels: str = opt("", "labels file: one name per line (line = id), 'id name' lines or a JSON "
                      "object; 'imagenet' and 'voc' are built in", metavar="FILE")
    input_size: Size = opt(None, "model input WxH (default: from the model)",
                                                metavar="WxH")
    color: Literal["auto", "rgb", "bgr"] = opt("auto", "colour order the model expects")
    scale: Auto = opt(None, "multiply pixels by this before mean/std (default 1/255 "
                                 "for ONNX, none for awscam)", metavar="FACTOR", gt=0, le=1e6)
    mean: Triple = opt(
        None, "per-channel mean subtracted after scaling", metavar="M|R,G,B")
    std: Annotated[Triple, AfterValidator(_nonzero)] = opt(
        None, "per-channel std divided by after the mean", metavar="S|R,G,B")
    center_crop: Annotated[Auto, AfterValidator(_floor(MIN_CENTER_CROP, "whole frame"))] = opt(
        None, "centre-crop this fraction of the short side before resizing (0.875 for ImageNet "
        "habits; 0 = whole frame, else at least 0.05)", metavar="FRACTION", ge=0, le=1)
    model_backend: Literal["auto", "onnx", "awscam"] = opt(
        "auto", "run the model through ONNX Runtime or awscam.Model (auto: awscam for device "
        "artifacts)")
    device_gpu: bool = opt(True, "awscam.Model loading config {'GPU': 1} (on) or {'GPU': 0} (off)",
                           metavar="on|off")
    device_runtime: Count = opt(0, "awscam.Model runtime: 0 = Intel DLDT (.xml), 1 = Neo (compiled "
                              "folder)", metavar="0|1", ge=0, le=1)
    mo_platform: Literal["mx", "MXNet", "tf", "TensorFlow", "caffe", "Caffe"] = opt(
        "mx", "framework of an unoptimized artifact given to mo.optimize")
    mo_aux: JsonObject = opt({}, "mo.optimize aux_inputs as JSON, e.g. "
                                 "'{\"--epoch\": 0, \"--precision\": \"FP16\"}'", metavar="JSON")
    threads: Count = opt(0, "ONNX Runtime intra-op threads (0 = auto: one CPU left to serving, so 1 "
                       "on 2 CPUs; 1 with --loop-cpu N; one per core with --loop-cpu off)",
                       metavar="N", ge=0, le=64)
    loop_cpu: LoopCpu = opt("auto", "CPU the inference loop keeps to itself while the model sets the "
                        "pace, the serving threads kept off it: auto (the last CPU, with 2 or more "
                        "CPUs and a model on the CPU), off, or a CPU number", metavar="auto|off|N")
    # -- results and display ---------------------------------------------------------------------
    top_k: Count = opt(5, "results kept per frame", live=True, metavar="K", ge=1, le=1000)
    threshold: float = opt(0.0, "keep results with prob > threshold (default 0, detectors 0.25)",
                           live=True, metavar="P", ge=0, le=1)
    display_res: Literal["480p", "720p", "1080p", "native"] = opt(
        "720p", "size the annotated frame is drawn at, at most (smaller sources keep their size): "
        "480p (858x480) | 720p | 1080p | native", live=True)
    overlay: bool = opt(True, "draw labels/boxes/masks and the fps line on the frame", live=True,
                        metavar="on|off")
    jpeg_quality: Count = opt(80, "JPEG quality of the streams", live=True, metavar="Q", ge=10, le=100)
    # -- server ----------------------------------------------------------------------------------
    host: str = opt("0.0.0.0", "address the dashboard listens on", group="server", metavar="HOST",
                    min_length=1)
    port: Count = opt(8080, "port of the dashboard (8000 is the Greengrass core's)", group="server",
                    metavar="PORT", ge=1, le=65535)
    token: Token = opt("", "control token for changing settings, 16 characters or more (default: "
                       "generated at start and logged once)", group="server", metavar="TOKEN",
                       secret=True)
    token_file: str = opt("", "file a generated token is kept in (owner-only), so it survives "
                          "restarts (default: $XDG_STATE_HOME/deeplens-dashboard/token, else "
                          "~/.local/state/deeplens-dashboard/token; off: a new token each start); "
                          "a --token is never written", group="server", metavar="PATH|off")
    allowed_hosts: Hosts = opt("", "host names (or IP addresses) the dashboard answers to, separated "
                               "by commas; other Host headers get 400, which stops a page that "
                               "re-points its own name at the device (DNS rebinding) from reading "
                               "it (default: any, so a device reached by any name or IP works)",
                               group="server", metavar="HOST,...")
    protect_views: bool = opt(False, "require the token for the stream, snapshot and results too",
                              group="server", metavar="on|off")
    max_viewers: Count = opt(64, "concurrent MJPEG viewers allowed, and SSE subscribers; beyond: 503",
                           group="server", metavar="N", ge=1, le=10000)
    serving_nice: Count = opt(10, "nice value the JPEG encoders, the FIFO writer and the IoT publisher "
                            "add to their own, so the inference loop gets the CPU first (0 = same "
                            "priority as the loop)", group="server", metavar="N", ge=0, le=19)
    ssl_certfile: str = opt("", "serve HTTPS with this certificate (PEM)", group="server",
                            metavar="FILE")
    ssl_keyfile: str = opt("", "private key of --ssl-certfile (PEM)", group="server", metavar="FILE")
    log_level: Literal["debug", "info", "warning", "error"] = opt("info", "log verbosity",
                                                                  group="server")
    # -- outputs ---------------------------------------------------------------------------------
    fifo: str = opt("/tmp/results.mjpeg", "project-stream FIFO for mplayer, or 'off'",
                    group="outputs", metavar="PATH|off", min_length=1)
    fifo_res: Literal["480p", "720p", "1080p"] = opt(
        "480p", "resolution written to the FIFO (a smaller source is written at its own size)",
        group="outputs", live=True)
    iot: Literal["auto", "greengrass", "mqtt", "log", "off"] = opt(
        "auto", "where results are published: auto = greengrass inside a core, mqtt with --mqtt, "
        "else log", group="outputs")
    mqtt: MqttUrl = opt("", "MQTT broker, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (AWS IoT Core: "
                    "mqtts://PREFIX-ats.iot.REGION.amazonaws.com with --mqtt-ca/-cert/-key); a user "
                    "and password may come as mqtt://USER:PASSWORD@HOST, better by --mqtt-username "
                    "and DEEPLENS_MQTT_PASSWORD or --mqtt-password-file", group="outputs",
                    metavar="URL")
    mqtt_ca: str = opt("", "CA certificate for mqtts://", group="outputs", metavar="FILE")
    mqtt_cert: str = opt("", "client certificate for mqtts://", group="outputs", metavar="FILE")
    mqtt_key: str = opt("", "client key for mqtts://", group="outputs", metavar="FILE")
    mqtt_alpn: Alpn = opt("auto", "TLS ALPN protocols for mqtts://: auto (x-amzn-mqtt-ca on port "
                         "443, which AWS IoT Core needs there), off, or names separated by commas",
                         group="outputs", metavar="auto|off|NAMES")
    mqtt_client_id: str = opt("", "MQTT client id (default: the thing name, which AWS IoT "
                              "policies usually expect)", group="outputs", metavar="ID")
    mqtt_username: str = opt("", "user name for brokers that require a login", group="outputs",
                             metavar="USER")
    mqtt_password: str = opt("", "password for --mqtt-username (prefer the env var or "
                             "--mqtt-password-file: a flag shows in the process list)",
                             group="outputs", metavar="PASSWORD", secret=True)
    mqtt_password_file: str = opt("", "file whose first line is the MQTT password",
                                  group="outputs", metavar="FILE")
    thing_name: str = opt("", "IoT thing (default: $AWS_IOT_THING_NAME, else "
                          "deeplens-<hostname>)", group="outputs", metavar="NAME")
    iot_topic: Topic = opt("$aws/things/{thing}/infer", "topic the results go to; {thing} is the "
                         "thing name. The seed's $aws/... topic was published by a Greengrass core: "
                         "AWS IoT Core reserves $-topics, so publishing to it directly use e.g. "
                         "deeplens/{thing}/infer", group="outputs", metavar="TOPIC")
    iot_queue: Count = opt(1000, "messages kept while the broker is away, delivered in order when it "
                         "is back; beyond, the oldest are dropped and counted", group="outputs",
                         metavar="N", ge=1, le=100000)
    iot_payload: Literal["seed", "rich"] = opt(
        "seed", "seed = {label: prob} as the original Lambda; rich = seq, timestamp, model and "
        "full results", group="outputs", live=True)
    iot_max_rate: float = opt(1.0, "results published per second at most, the newest going out "
                              "within 1/N s (0 = one per inference, as the seed)", group="outputs",
                              live=True, metavar="PER_S", ge=0, le=1000)
    iot_send_empty: bool = opt(False, "also publish {} when no result passes --threshold (a "
                               "heartbeat at --iot-max-rate); off: nothing is sent then",
                               group="outputs", live=True, metavar="on|off")
    iot_on_change: bool = opt(False, "publish only when the payload's labels change",
                              group="outputs", live=True, metavar="on|off")
    # -- events ----------------------------------------------------------------------------------
    record: RecordRules = opt(
        (), "LABEL[:MIN_PROB] whose detections start an event (snapshots, a clip with pre-roll, "
        "a notice); repeatable, or separated by commas; 'any' for every label that passes "
        "--threshold; none: no recording", group="events", metavar="LABEL[:P]", repeatable=True)
    record_debounce: Count = opt(3, "results in a row a label must match before an event starts",
                                 group="events", metavar="N", ge=1, le=100)
    pre_roll: float = opt(5.0, "seconds of video kept before each event starts", group="events",
                          metavar="SECONDS", ge=0, le=60)
    post_roll: float = opt(5.0, "seconds without the label before its event ends",
                           group="events", metavar="SECONDS", ge=0, le=600)
    record_max: float = opt(300.0, "longest event; a longer one is split", group="events",
                            metavar="SECONDS", ge=10, le=86400)
    record_cooldown: float = opt(5.0, "seconds after an event ends before its label can start "
                                 "another", group="events", metavar="SECONDS", ge=0, le=3600)
    record_fps: float = opt(10.0, "frames per second of clips and of the pre-roll buffer",
                            group="events", metavar="FPS", ge=1, le=30)
    data_dir: str = opt("", "folder of the event history (events.db, clips, snapshots) (default: "
                        "$XDG_DATA_HOME/deeplens-dashboard, else ~/.local/share/deeplens-dashboard)",
                        group="events", metavar="DIR")
    retain_days: float = opt(30.0, "events older than this are deleted (0 = no age limit)",
                             group="events", metavar="DAYS", ge=0, le=36500)
    retain_mb: float = opt(1024.0, "the oldest events are deleted while their files take more than "
                           "this (0 = no size limit)", group="events", metavar="MB", ge=0,
                           le=10_000_000)

    @field_validator("*", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    # -- defaults that depend on the model --------------------------------------------------------
    @model_validator(mode="after")
    def _model_defaults(self) -> Settings:
        # A detector left at threshold 0 draws every low-confidence candidate: unless someone set
        # a threshold, it gets the samples' 0.25. Not in model_fields_set, so a later change of
        # model recomputes it.
        if "threshold" not in self.model_fields_set:
            kind = self.model_type or model_type_of(self.model)
            object.__setattr__(self, "threshold", SSD_DEFAULT_THRESHOLD if kind == "ssd" else 0.0)
        return self

    # -- building and changing -------------------------------------------------------------------
    @classmethod
    def load(cls, flags: Optional[Mapping[str, Any]] = None, env: Optional[Mapping[str, str]] = None,
             file: str = "", base: Optional[Mapping[str, Any]] = None) -> Settings:
        """``base`` (e.g. the device's defaults), then the TOML ``file``, the ``DEEPLENS_*`` env
        vars, then ``flags`` on top. Raises ConfigError naming where the bad value came from."""
        env = os.environ if env is None else env
        origins: Dict[str, str] = {}
        values: Dict[str, Any] = dict(base or {})
        if file:
            from_file, lines = read_toml(file)
            values.update(from_file)
            origins.update({k: f"{file}, line {n}" if n else file for k, n in lines.items()})
        for name in cls.model_fields:
            if ENV_PREFIX + name.upper() in env:
                values[name] = env[ENV_PREFIX + name.upper()]
                origins[name] = "env"
        for name, value in (flags or {}).items():
            if name not in cls.model_fields:
                raise ConfigError(name, f"unknown setting {name!r}", "flag")
            values[name] = value
            origins[name] = "flag"
        return cls.build(values, origins)

    @classmethod
    def build(cls, values: Mapping[str, Any], origins: Optional[Mapping[str, str]] = None) -> Settings:
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            raise config_error(exc, origins or {}) from None

    def changed(self, changes: Mapping[str, Any]) -> Settings:
        """A new instance with ``changes``, validated as a whole (model defaults recomputed)."""
        unknown = [name for name in changes if name not in type(self).model_fields]
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting {unknown[0]!r}")
        return self.build({**self.model_dump(exclude_unset=True), **changes})

    def replace(self, **changes: Any) -> Settings:
        return self.changed(changes)

    def public(self) -> Dict[str, Any]:
        """Every setting as JSON, secrets masked."""
        out: Dict[str, Any] = self.model_dump(mode="json")
        for name in SECRET_FIELDS:
            out[name] = "***" if out[name] else ""
        out["mqtt"] = redact_url(out["mqtt"])
        return out


def _extra(name: str) -> Dict[str, Any]:
    extra = Settings.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


LIVE_FIELDS = frozenset(n for n in Settings.model_fields if _extra(n).get("live"))
SECRET_FIELDS = frozenset(n for n in Settings.model_fields if _extra(n).get("secret"))
GROUPS = ("pipeline", "server", "outputs", "events")


def field_group(name: str) -> str:
    return str(_extra(name).get("group", "pipeline"))


def field_metavar(name: str) -> str:
    return str(_extra(name).get("metavar", ""))


def field_repeatable(name: str) -> bool:
    return bool(_extra(name).get("repeatable"))


def config_error(exc: ValidationError, origins: Mapping[str, str]) -> ConfigError:
    """The first error of a validation, as a ConfigError naming its field and origin."""
    error = exc.errors()[0]
    loc = [str(part) for part in error.get("loc", ())]
    field = loc[0] if loc else ""
    message = str(error.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if field not in Settings.model_fields:
        # An after-validator of the whole model, or an unknown name.
        return ConfigError(field or "settings", message if field else message, origins.get(field, ""))
    value = error.get("input")
    if field not in SECRET_FIELDS and isinstance(value, (str, int, float)) and len(str(value)) < 80:
        message = f"{message}, got {redact_url(str(value))!r}" if "got" not in message else message
    return ConfigError(field, message, origins.get(field, ""))


def read_toml(path: str) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """``option = value`` lines (names as the flags, ``-`` or ``_``) and each key's line number.
    Raises ConfigError naming the file (and the line and key) for anything it cannot use."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python < 3.11
        import tomli as tomllib
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}", path) from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError("config", f"not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", str(exc), path) from None
    values: Dict[str, Any] = {}
    lines: Dict[str, int] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        line = _key_line(text, key)
        if name not in Settings.model_fields:
            where = f"{path}, line {line}" if line else path
            raise ConfigError(name, f"unknown key {key!r}", where)
        values[name] = value
        lines[name] = line
    return values, lines


def _key_line(text: str, key: str) -> int:
    pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return 0


def _patch_model() -> Any:
    """The body of ``PATCH /api/config``: every live setting, optional, typed as in Settings (so
    ``/openapi.json`` shows them); Settings validates the result as a whole."""
    fields = {
        name: (Optional[info.annotation], FieldInfo.merge_field_infos(info, default=None))
        for name, info in Settings.model_fields.items() if name in LIVE_FIELDS
    }
    return create_model("ConfigPatch", __config__=ConfigDict(extra="forbid", protected_namespaces=()),
                        **fields)  # type: ignore[call-overload]


ConfigPatch = _patch_model()
