"""Settings: every option defined once, as a CLI flag and an environment variable, validated.

An error names the option (and the env var when the value came from there) and the bad value,
so the CLI can exit with code 2 and the HTTP API can answer 422 naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inference import RESOLUTION_NAMES
from inference.affinity import parse_loop_cpu
from inference.types import MODEL_TYPES

ENV_PREFIX = "DEEPLENS_"


class SettingError(ValueError):
    """A bad value for one setting; ``field`` is the settings name (``top_k``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    @property
    def option(self) -> str:
        return "--" + self.field.replace("_", "-")


# -- value parsers: each raises ValueError with a message that reads after "option: " ----------
def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            number = int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
        if not lo <= number <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {number}")
        return number

    return parse


def _float_range(lo: float, hi: float, lo_open: bool = False) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if number != number or (number <= lo if lo_open else number < lo) or number > hi:
            bound = f"above {lo}" if lo_open else f"at least {lo}"
            raise ValueError(f"must be {bound} and at most {hi}, got {value!r}")
        return number

    return parse


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return text

    return parse


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected on/off (true/false, 1/0), got {value!r}")


def parse_size(value: Any) -> tuple[int, int] | None:
    text = str(value).strip().lower()
    if text in ("", "auto"):
        return None
    match = re.fullmatch(r"(\d+)\s*[x,]\s*(\d+)", text)
    if not match:
        raise ValueError(f"expected WxH such as 224x224, got {value!r}")
    w, h = int(match.group(1)), int(match.group(2))
    if not (8 <= w <= 4096 and 8 <= h <= 4096):
        raise ValueError(f"width and height must be 8..4096, got {value!r}")
    return w, h


def parse_triple(value: Any) -> tuple[float, float, float] | None:
    text = str(value).strip()
    if text in ("", "auto"):
        return None
    parts = [p for p in re.split(r"[,\s]+", text) if p]
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"expected one or three numbers, got {value!r}") from None
    if len(nums) == 1:
        nums *= 3
    if len(nums) != 3 or any(n != n for n in nums):
        raise ValueError(f"expected one or three numbers, got {value!r}")
    if not all(math.isfinite(n) for n in nums):
        raise ValueError(f"must be finite, got {value!r}")
    return nums[0], nums[1], nums[2]


def parse_std(value: Any) -> tuple[float, float, float] | None:
    """As parse_triple; a zero would divide every pixel by zero (NaN on every frame)."""
    std = parse_triple(value)
    if std is not None and 0.0 in std:
        raise ValueError(f"must not be 0 (every pixel is divided by it), got {value!r}")
    return std


def parse_optional_float(value: Any) -> float | None:
    text = str(value).strip().lower()
    if text in ("", "auto"):
        return None
    number = _float_range(0.0, 1e6)(text)
    return number


def parse_source_fps(value: Any) -> float | None:
    text = str(value).strip().lower()
    if text in ("", "auto", "native"):
        return None
    return _float_range(0.0, 240.0)(text)


def parse_json_object(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    text = str(value).strip()
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"expected a JSON object, got {value!r} ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {value!r}")
    return data


def _text(value: Any) -> str:
    return str(value).strip()


def _nonempty(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def parse_fifo(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("give a path or 'off'")
    return text


MQTT_URL = re.compile(r"(mqtts?)://(?:([^@/\s]*)@)?([^@/\s:]+)(?::(\d{1,5}))?/?")


def parse_mqtt_url(value: Any) -> str:
    text = str(value).strip()
    if not text:
        return ""
    match = MQTT_URL.fullmatch(text)
    if not match:
        raise ValueError(f"expected mqtt://[USER[:PASSWORD]@]HOST[:PORT] or mqtts://..., got "
                         f"{redact_url(text)!r}")
    port = match.group(4)
    if port is not None and not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be 1..65535, got {port}")
    return text


def redact_url(url: str) -> str:
    """``url`` with the password of its user info masked, for logs and /api/config."""
    return re.sub(r"(://[^:@/\s]*:)[^@/\s]*@", r"\1***@", url)


def parse_topic(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    if any(ch in text for ch in "+#\0"):
        raise ValueError(f"a topic to publish to cannot hold the wildcards + or #, got {value!r}")
    if len(text.encode("utf-8")) > 256:
        raise ValueError("longer than 256 bytes (the AWS IoT Core topic limit)")
    return text


def parse_alpn(value: Any) -> str:
    text = str(value).strip()
    if text.lower() in ("", "auto", "off"):
        return text.lower() or "auto"
    protocols = [p.strip() for p in text.split(",")]
    if not all(protocols) or any(len(p) > 255 or not p.isprintable() for p in protocols):
        raise ValueError(f"expected auto, off or protocol names separated by commas, got {value!r}")
    return ",".join(protocols)


@dataclass(frozen=True)
class Option:
    name: str  # settings field
    parse: Callable[[Any], Any]
    help: str
    group: str = "pipeline"
    live: bool = False  # can change while running (PATCH /api/config)
    metavar: str | None = None
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


@dataclass
class Settings:
    # source
    source: str = ""  # "" = default: awscam when importable, else demo
    source_fps: float | None = None
    slide_interval: float = 3.0
    # model
    model: str = ""  # "" = default: efficientnet-lite0 off the device, the seed's model on it
    model_type: str = ""
    labels: str = ""
    input_size: tuple[int, int] | None = None
    color: str = "auto"
    scale: float | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    center_crop: float | None = None
    model_backend: str = "auto"
    device_gpu: bool = True
    device_runtime: int = 0
    mo_platform: str = "mx"
    mo_aux: dict[str, Any] = field(default_factory=dict)
    threads: int = 0
    loop_cpu: str = "auto"
    # results and display
    top_k: int = 5
    threshold: float = 0.0
    display_res: str = "720p"
    overlay: bool = True
    jpeg_quality: int = 80
    # server
    host: str = "0.0.0.0"
    port: int = 8080
    token: str = ""
    protect_views: bool = False
    max_viewers: int = 64
    serving_nice: int = 10
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    # outputs
    fifo: str = "/tmp/results.mjpeg"
    fifo_res: str = "480p"
    iot: str = "auto"
    mqtt: str = ""
    mqtt_ca: str = ""
    mqtt_cert: str = ""
    mqtt_key: str = ""
    mqtt_alpn: str = "auto"
    mqtt_client_id: str = ""
    mqtt_username: str = ""
    mqtt_password: str = ""
    mqtt_password_file: str = ""
    iot_topic: str = "$aws/things/{thing}/infer"
    iot_queue: int = 1000
    thing_name: str = ""
    iot_payload: str = "seed"
    iot_max_rate: float = 0.0
    iot_on_change: bool = False
    log_level: str = "info"
    # The options someone set (file, env or flag), so a model can supply defaults for the rest.
    explicit: frozenset[str] = field(default_factory=frozenset, compare=False, repr=False)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def public(self) -> dict[str, Any]:
        """Every setting as JSON, secrets masked."""
        out: dict[str, Any] = {}
        for opt in OPTIONS:
            value = getattr(self, opt.name)
            if opt.secret:
                value = "***" if value else ""
            elif opt.name == "mqtt":
                value = redact_url(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[opt.name] = value
        return out


RES = _choice(*RESOLUTION_NAMES)

OPTIONS: tuple[Option, ...] = (
    Option("source", _text, "frame source: awscam | demo | synthetic[:WxH][@FPS] | a video file | "
           "a webcam index (0) | an rtsp:// or http:// URL | an image, folder or glob of images "
           "(default: awscam when present, else demo, the bundled bikes.mp4)", live=True,
           metavar="SOURCE"),
    Option("source_fps", parse_source_fps, "pace of the source in frames per second: 'native' "
           "(files at their own fps, cameras as they come, images at 5), or a number; 0 = unpaced",
           metavar="FPS|native"),
    Option("slide_interval", _float_range(0.0, 86400.0, lo_open=True),
           "seconds each image stays up in an image slideshow", metavar="SECONDS"),
    Option("model", _text, "efficientnet-lite0 | catdog | centerface | an .onnx file | on the "
           "device an .xml, a Neo folder or an artifact name for mo.optimize "
           "(default: efficientnet-lite0 off the device)", live=True, metavar="MODEL"),
    Option("model_type", _choice("", *MODEL_TYPES), "result type of a user model: "
           "classification | ssd | segmentation (built-in models know theirs)", metavar="TYPE"),
    Option("labels", _text, "labels file: one name per line (line = id), 'id name' lines or a "
           "JSON object; 'imagenet' and 'voc' are built in", metavar="FILE"),
    Option("input_size", parse_size, "model input WxH (default: from the model)", metavar="WxH"),
    Option("color", _choice("auto", "rgb", "bgr"), "colour order the model expects"),
    Option("scale", parse_optional_float, "multiply pixels by this before mean/std "
           "(default 1/255 for ONNX, none for awscam)", metavar="FACTOR"),
    Option("mean", parse_triple, "per-channel mean subtracted after scaling", metavar="M|R,G,B"),
    Option("std", parse_std, "per-channel std divided by after the mean", metavar="S|R,G,B"),
    Option("center_crop", parse_optional_float, "centre-crop this fraction of the short side "
           "before resizing (0.875 for ImageNet habits; 0 = whole frame)", metavar="FRACTION"),
    Option("model_backend", _choice("auto", "onnx", "awscam"), "run the model through ONNX "
           "Runtime or awscam.Model (auto: awscam for device artifacts)"),
    Option("device_gpu", parse_bool, "awscam.Model loading config {'GPU': 1} (on) or "
           "{'GPU': 0} (off)", metavar="on|off"),
    Option("device_runtime", _int_range(0, 1), "awscam.Model runtime: 0 = Intel DLDT (.xml), "
           "1 = Neo (compiled folder)", metavar="0|1"),
    Option("mo_platform", _choice("mx", "MXNet", "tf", "TensorFlow", "caffe", "Caffe"),
           "framework of an unoptimized artifact given to mo.optimize"),
    Option("mo_aux", parse_json_object, "mo.optimize aux_inputs as JSON, e.g. "
           "'{\"--epoch\": 0, \"--precision\": \"FP16\"}'", metavar="JSON"),
    Option("threads", _int_range(0, 64), "ONNX Runtime intra-op threads (0 = auto: one CPU "
           "left to serving, so 1 on 2 CPUs, which --loop-cpu auto then isolates; 1 with "
           "--loop-cpu N; one per core with --loop-cpu off); with more than 1, --loop-cpu auto "
           "does not pin"),
    Option("loop_cpu", parse_loop_cpu, "CPU the inference loop keeps to itself, the process's "
           "other threads kept off it: auto (the last CPU, with 2 or more CPUs and a model on the "
           "CPU), off, or a CPU number", metavar="auto|off|N"),
    Option("top_k", _int_range(1, 1000), "results kept per frame", live=True, metavar="K"),
    Option("threshold", _float_range(0.0, 1.0), "keep results with prob > threshold",
           live=True, metavar="P"),
    Option("display_res", RES, "size the annotated frame is drawn at, at most (smaller sources "
           "keep their size): 480p (858x480) | 720p | 1080p | native", live=True),
    Option("overlay", parse_bool, "draw labels/boxes/masks and the fps line on the frame",
           live=True, metavar="on|off"),
    Option("jpeg_quality", _int_range(10, 100), "JPEG quality of the streams", live=True),
    Option("host", _nonempty, "address the dashboard listens on", group="server"),
    Option("port", _int_range(1, 65535), "port of the dashboard (8000 is the Greengrass core's)",
           group="server"),
    Option("token", _text, "control token for changing settings (default: generated at start "
           "and logged once)", group="server", secret=True),
    Option("protect_views", parse_bool, "require the token for the stream, snapshot and results "
           "too", group="server", metavar="on|off"),
    Option("max_viewers", _int_range(1, 10000), "concurrent MJPEG viewers allowed; beyond: 503",
           group="server"),
    Option("serving_nice", _int_range(0, 19), "nice value the JPEG encoders, the FIFO writer and "
           "the IoT publisher add to their own, so the inference loop gets the CPU first "
           "(0 = same priority as the loop)", group="server", metavar="N"),
    Option("ssl_certfile", _text, "serve HTTPS with this certificate (PEM)", group="server",
           metavar="FILE"),
    Option("ssl_keyfile", _text, "private key of --ssl-certfile (PEM)", group="server",
           metavar="FILE"),
    Option("fifo", parse_fifo, "project-stream FIFO for mplayer, or 'off'", group="outputs",
           metavar="PATH|off"),
    Option("fifo_res", _choice("480p", "720p", "1080p"), "resolution written to the FIFO (a "
           "smaller source is written at its own size, never upscaled)",
           group="outputs", live=True),
    Option("iot", _choice("auto", "greengrass", "mqtt", "log", "off"), "where results are "
           "published: auto = greengrass inside a core, mqtt with --mqtt, else log",
           group="outputs"),
    Option("mqtt", parse_mqtt_url, "MQTT broker, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] "
           "(AWS IoT Core: mqtts://PREFIX-ats.iot.REGION.amazonaws.com, with --mqtt-ca/-cert/-key); "
           "a user and password may come as mqtt://USER:PASSWORD@HOST, better by "
           "--mqtt-username and DEEPLENS_MQTT_PASSWORD or --mqtt-password-file",
           group="outputs", metavar="URL"),
    Option("mqtt_ca", _text, "CA certificate for mqtts://", group="outputs", metavar="FILE"),
    Option("mqtt_cert", _text, "client certificate for mqtts://", group="outputs", metavar="FILE"),
    Option("mqtt_key", _text, "client key for mqtts://", group="outputs", metavar="FILE"),
    Option("mqtt_alpn", parse_alpn, "TLS ALPN protocols for mqtts://: auto (x-amzn-mqtt-ca on "
           "port 443, which AWS IoT Core needs there), off, or names separated by commas",
           group="outputs", metavar="auto|off|NAMES"),
    Option("mqtt_client_id", _text, "MQTT client id (default: the thing name, which AWS IoT "
           "policies usually expect)", group="outputs", metavar="ID"),
    Option("mqtt_username", _text, "user name for brokers that require a login",
           group="outputs", metavar="USER"),
    Option("mqtt_password", _text, "password for --mqtt-username (prefer the env var or "
           "--mqtt-password-file: a flag shows in the process list)", group="outputs",
           metavar="PASSWORD", secret=True),
    Option("mqtt_password_file", _text, "file whose first line is the MQTT password",
           group="outputs", metavar="FILE"),
    Option("iot_topic", parse_topic, "topic the results go to; {thing} is the thing name. The "
           "seed's $aws/things/{thing}/infer was published by a Greengrass core: AWS IoT Core "
           "reserves $-topics, so publishing to it directly use e.g. deeplens/{thing}/infer",
           group="outputs", metavar="TOPIC"),
    Option("iot_queue", _int_range(1, 100000), "messages kept while the broker is away, "
           "delivered in order when it is back; beyond, the oldest are dropped and counted",
           group="outputs", metavar="N"),
    Option("thing_name", _text, "IoT thing: topic $aws/things/<thing>/infer (default: "
           "$AWS_IOT_THING_NAME, else deeplens-<hostname>)", group="outputs", metavar="NAME"),
    Option("iot_payload", _choice("seed", "rich"), "seed = {label: prob} as the original Lambda; "
           "rich = seq, timestamp, model and full results", group="outputs", live=True),
    Option("iot_max_rate", _float_range(0.0, 1000.0), "messages per second at most "
           "(0 = one per inference, as the seed)", group="outputs", live=True, metavar="PER_S"),
    Option("iot_on_change", parse_bool, "publish only when the payload's labels change",
           group="outputs", live=True, metavar="on|off"),
    Option("log_level", _choice("debug", "info", "warning", "error"), "log verbosity",
           group="server"),
)
OPTIONS_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
LIVE_FIELDS: frozenset[str] = frozenset(o.name for o in OPTIONS if o.live)


def parse_value(name: str, value: Any) -> Any:
    opt = OPTIONS_BY_NAME.get(name)
    if opt is None:
        raise SettingError(name, f"unknown setting {name!r}")
    try:
        return opt.parse(value)
    except (ValueError, TypeError) as exc:
        raise SettingError(name, f"{opt.flag}: {exc}") from None


def _key_line(text: str, key: str) -> int:
    pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return 0


def from_file(path: str, base: Settings | None = None) -> Settings:
    """Settings from a TOML file of ``option = value`` lines (names as the flags, ``-`` or ``_``).

    Errors name the file, the line and the key. Values are checked as the flags' are.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    try:
        text = open(path, encoding="utf-8").read()
    except OSError as exc:
        raise SettingError("config", f"--config: cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingError("config", f"--config: {path}: {exc}") from None
    changes: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        line = _key_line(text, key)
        where = f"{path}, line {line}" if line else path
        if name not in OPTIONS_BY_NAME or name == "config":
            raise SettingError(name, f"--config: {where}: unknown key {key!r}")
        opt = OPTIONS_BY_NAME[name]
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        try:
            changes[name] = opt.parse(value)
        except (ValueError, TypeError) as exc:
            raise SettingError(name, f"--config: {where}: {key}: {exc}") from None
    base = base or Settings()
    return base.replace(**changes, explicit=base.explicit | set(changes))


def from_env(base: Settings | None = None, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    settings = base or Settings()
    changes: dict[str, Any] = {}
    for opt in OPTIONS:
        if opt.env in env:
            try:
                changes[opt.name] = opt.parse(env[opt.env])
            except (ValueError, TypeError) as exc:
                raise SettingError(opt.name, f"{opt.flag} (from {opt.env}): {exc}") from None
    return settings.replace(**changes, explicit=settings.explicit | set(changes))


def validate_changes(changes: Mapping[str, Any], live_only: bool = True) -> dict[str, Any]:
    """Parse a set of changes; the first bad one raises naming its field. Nothing is applied."""
    out: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in OPTIONS_BY_NAME:
            raise SettingError(name, f"unknown setting {name!r}")
        if live_only and name not in LIVE_FIELDS:
            raise SettingError(name, f"{name} cannot change while running; restart with its option")
        out[name] = parse_value(name, value)
    return out


def add_arguments(parser: argparse.ArgumentParser, groups: Sequence[str]) -> None:
    """One flag per option of ``groups``; the default is the env var, checked when parsed."""
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help=f"TOML file of option = value lines, below env vars and flags (env {ENV_PREFIX}CONFIG)",
    )
    for group_name in groups:
        group = parser.add_argument_group(group_name)
        for opt in OPTIONS:
            if opt.group != group_name:
                continue
            spec = Settings.__dataclass_fields__[opt.name]
            default = spec.default
            if default is dataclasses.MISSING and spec.default_factory is not dataclasses.MISSING:
                default = spec.default_factory()
            shown = "" if default in ("", None, {}) else f" [default: {_show(default)}]"
            group.add_argument(
                opt.flag,
                dest=opt.name,
                default=None,
                metavar=opt.metavar,
                help=f"{opt.help}{shown} (env {opt.env})".replace("%", "%%"),
            )


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def from_args(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """A config file, then env vars, then flags on top; raises SettingError naming the option."""
    env = os.environ if env is None else env
    config = getattr(ns, "config", None) or env.get(ENV_PREFIX + "CONFIG", "")
    settings = from_file(config) if config else None
    settings = from_env(settings, env=env)
    changes: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = getattr(ns, opt.name, None)
        if raw is not None:
            changes[opt.name] = parse_value(opt.name, raw)
    return settings.replace(**changes, explicit=settings.explicit | set(changes))
