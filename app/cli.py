"""``deeplens-dashboard``: serve the dashboard (default), run headless, or build the Lambda zip.

Every option has an env var (``DEEPLENS_<OPTION>``); a bad value exits with code 2 naming the
option; a model or labels file that cannot load is refused at start naming the path.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from inference.sources.awscam import preload_awscam

preload_awscam()  # before any import of cv2 (the device's cv2 needs awscam loaded first)

from inference.config import SettingError, Settings, add_arguments, from_args  # noqa: E402
from inference.loop import InferenceLoop  # noqa: E402
from inference.models import with_model_defaults  # noqa: E402

log = logging.getLogger("app")

COMMANDS = ("serve", "infer", "package-lambda", "package-device")
EXIT_USAGE = 2
EXIT_START = 1


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="deeplens-dashboard",
        description="Camera inference with a live dashboard, the DeepLens project-stream FIFO and "
        "IoT results. With no command it serves the dashboard on 0.0.0.0:8080.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the loop and serve the dashboard (the default)")
    add_arguments(serve, ("pipeline", "server", "outputs"))
    infer = sub.add_parser(
        "infer", help="run the loop headless and print one JSON line per frame",
        description="Run the loop without a server; print one JSON line per frame: the seed's "
        "{label: prob} payload and the full result.",
    )
    infer.add_argument("--frames", type=_positive_int, default=10,
                       help="frames to process before exiting (default 10)")
    add_arguments(infer, ("pipeline",))
    package = sub.add_parser(
        "package-lambda", help="build the Greengrass Lambda deployment zip",
        description="Build the Greengrass Lambda zip (handler lambda_main.lambda_handler) from "
        "wheels downloaded for the device's Python; numpy, OpenCV and the off-device models are "
        "left out.",
    )
    package.add_argument("-o", "--output", required=True, help="zip file to write")
    _add_target_arguments(package)
    device = sub.add_parser(
        "package-device", help="build the offline install bundle (tar.gz) for a device",
        description="Build a self-contained tar.gz: the wheels of this product and its dependencies "
        "for the device's Python, install.sh, a systemd unit and an example config. On the device: "
        "tar xzf FILE && cd deeplens-dashboard-*/ && sudo ./install.sh",
    )
    device.add_argument("-o", "--output", required=True, help="tar.gz file to write")
    _add_target_arguments(device)
    return parser, {"serve": serve, "infer": infer, "package-lambda": package, "package-device": device}


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    # The defaults are the DeepLens's: the only Python that imports its awscam, glibc 2.23.
    parser.add_argument("--python-version", default="3.7", metavar="X.Y",
                        help="CPython version of the device (default: 3.7, the DeepLens's)")
    parser.add_argument("--platform", default="manylinux2014_x86_64", metavar="PLATFORM",
                        help="wheel platform of the device (default: manylinux2014_x86_64, "
                        "x86_64 with glibc 2.17 or newer)")
    parser.add_argument("--find-links", action="append", default=[], metavar="DIR|URL",
                        help="also look for wheels here (passed to pip; repeatable)")
    parser.add_argument("--no-index", action="store_true",
                        help="do not use the package index, only --find-links (passed to pip)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    args = list(argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("-h", "--help")):
        args.insert(0, "serve")
    return args


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    top, commands = _build()
    args = top.parse_args(_normalise_argv(sys.argv[1:] if argv is None else argv))
    parser = commands[args.command]
    if args.command in ("package-lambda", "package-device"):
        from app import package

        try:
            target = package.Target.parse(args.python_version, args.platform)
        except package.TargetError as exc:
            parser.error(f"{exc.option}: {exc}")
        setup_logging()
        build = package.build_lambda_zip if args.command == "package-lambda" else package.build_device_bundle
        return build(args.output, target, args.find_links, args.no_index)
    try:
        settings = with_model_defaults(from_args(args))
    except SettingError as exc:
        parser.error(exc.message)  # exits with 2, as argparse does for its own errors
    setup_logging(settings.log_level)
    if args.command == "infer":
        return run_infer(settings, args.frames, parser)
    from app.server import serve

    return int(serve(settings, parser))


def check_start(settings: Settings, parser: argparse.ArgumentParser) -> None:
    """Refuse at start what cannot work: an unknown source, an unreadable file or image set.

    A camera or stream that is down at start is not refused: the loop retries until it is back.
    """
    from inference.sources import SourceSpecError, default_source, make_source
    from inference.sources.images import ImagesSource
    from inference.sources.video import VideoSource
    from inference.types import SourceError

    try:
        source = make_source(settings.source or default_source(), settings.source_fps,
                             settings.slide_interval)
        if isinstance(source, ImagesSource) or (isinstance(source, VideoSource) and not source.live):
            source.open()
            if isinstance(source, VideoSource) and source.read() is None:
                raise SourceError(f"{source.name!r} holds no decodable frame")
            source.close()
    except (SourceSpecError, SourceError) as exc:
        parser.error(f"--source: {exc}")


def prepare(loop: InferenceLoop, parser: argparse.ArgumentParser) -> None:
    """Load the model and build the source, or exit 2 naming the option and the path."""
    from inference.types import ModelError, SourceError

    try:
        loop.prepare(strict=True)
    except ModelError as exc:
        parser.error(f"{exc.option}: {exc}")
    except SourceError as exc:
        parser.error(f"--source: {exc}")


def run_infer(settings: Settings, frames: int, parser: argparse.ArgumentParser) -> int:
    check_start(settings, parser)
    loop = InferenceLoop(settings)
    prepare(loop, parser)
    loop.start()
    seen = 0
    last_seq = 0
    deadline_idle = 30.0
    try:
        while seen < frames:
            item = loop.hub.wait_newer(last_seq, timeout=deadline_idle)
            if item is None:
                log.error("no frame for %.0f s; giving up", deadline_idle)
                return EXIT_START
            last_seq = item.seq
            result = item.result
            line: dict[str, Any] = {"payload": result.payload(), "result": result.to_json()}
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
            seen += 1
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
    return 0
