"""``deeplens-dashboard``: serve the dashboard (the default), run headless, or package it.

The options are generated from the settings model (:mod:`inference.settings`): one flag per
setting, its environment variable ``DEEPLENS_<OPTION>`` and a TOML file (``--config``) below
both. This module owns every exit code: 0 done, 1 could not start (the port is taken; ``infer``:
no frame could be inferred), 2 a bad value (the message names the option, or the env var, or the
file's line), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Set, Tuple

from inference.sources.awscam import preload_awscam

preload_awscam()  # before any import of cv2 (the device's cv2 needs awscam loaded first)

from typing_extensions import get_args  # noqa: E402

from app.nativelog import NativeStderr  # noqa: E402
from inference.settings import (  # noqa: E402
    ENV_PREFIX,
    GROUPS,
    ConfigError,
    Settings,
    field_group,
    field_metavar,
    field_repeatable,
)

log = logging.getLogger("app")

COMMANDS = ("serve", "infer", "package-lambda", "package-device")
EXIT_OK, EXIT_START, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A setting that cannot work, found at start; the message starts with the option."""


class Parser(argparse.ArgumentParser):
    """argparse with a short usage error: the full usage block of ~50 options buried the one
    line that matters, so an error is that line and where to find the options."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n"
                  f"(the options: {self.prog} --help)\n")


# -- the command line ----------------------------------------------------------------------------
DESCRIPTION = """\
Camera inference with a live dashboard, the DeepLens project-stream FIFO and IoT
results. With no command it serves the dashboard (on 0.0.0.0:8080 by default)
with the options below."""
COMMANDS_HELP = """commands:
  serve           run the loop and serve the dashboard (the default; the options above)
  infer           run headless and print one JSON line per frame or image
  package-lambda  build the Greengrass Lambda deployment zip
  package-device  build the offline install bundle (tar.gz) for a device
'deeplens-dashboard COMMAND --help' shows a command's options."""


def _parsers() -> Tuple[argparse.ArgumentParser, Dict[str, argparse.ArgumentParser]]:
    top = Parser(prog="deeplens-dashboard", allow_abbrev=False, description=DESCRIPTION)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    # `deeplens-dashboard --help` is this parser's help: the default command's options, which
    # are what a user looks for, and the other commands in the epilog.
    serve = sub.add_parser("serve", allow_abbrev=False, description=DESCRIPTION, epilog=COMMANDS_HELP,
                           usage="deeplens-dashboard [serve] [OPTIONS]",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           help="run the loop and serve the dashboard (the default)")
    add_settings_arguments(serve, GROUPS)
    infer = sub.add_parser(
        "infer", allow_abbrev=False, help="run the loop headless and print one JSON line per frame",
        usage="deeplens-dashboard infer [OPTIONS]",
        description="Run the loop without a server; print one JSON line per frame: the seed's "
        "{label: prob} payload and the full result.")
    infer.add_argument("--frames", type=_positive_int, default=None,
                       help="frames to process before exiting (default 10; a folder or glob is "
                       "walked once, file by file, and ends when its files do)")
    infer.add_argument("--save", metavar="DIR", default=None,
                       help="write each frame as shown, overlay drawn, as a JPEG into DIR (made if "
                       "missing), named after its file (NAME.jpg; a video's NAME-FRAME.jpg) or, "
                       "from a camera, its number (frame-000001.jpg)")
    add_settings_arguments(infer, ("pipeline",))
    package = sub.add_parser(
        "package-lambda", allow_abbrev=False, usage="deeplens-dashboard package-lambda -o FILE [OPTIONS]",
        help="build the Greengrass Lambda deployment zip",
        description="Build the Greengrass Lambda zip (handler lambda_main.lambda_handler) from "
        "wheels downloaded for the device's Python; numpy, OpenCV and the off-device models are "
        "left out.")
    package.add_argument("-o", "--output", required=True, help="zip file to write")
    _add_target_arguments(package)
    device = sub.add_parser(
        "package-device", allow_abbrev=False, usage="deeplens-dashboard package-device -o FILE [OPTIONS]",
        help="build the offline install bundle (tar.gz) for a device",
        description="Build a self-contained tar.gz: the wheels of this product and its dependencies "
        "for the device's Python, install.sh, a systemd unit and an example config. On the device: "
        "tar xzf FILE && cd deeplens-dashboard-*/ && sudo ./install.sh")
    device.add_argument("-o", "--output", required=True, help="tar.gz file to write")
    _add_target_arguments(device)
    return top, {"serve": serve, "infer": infer, "package-lambda": package, "package-device": device}


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


def build_parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def add_settings_arguments(parser: argparse.ArgumentParser, groups: Sequence[str]) -> None:
    """One flag per setting of ``groups``; unset flags stay None so the env and file show."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help=f"TOML file of option = value lines, below env vars and flags "
                        f"(env {ENV_PREFIX}CONFIG)")
    defaults = Settings().model_dump()
    for group_name in groups:
        group = parser.add_argument_group(group_name)
        for name, info in Settings.model_fields.items():
            if field_group(name) != group_name:
                continue
            choices = [c for c in get_args(info.annotation) if isinstance(c, str) and c]
            metavar = field_metavar(name) or ("{" + ",".join(choices) + "}" if choices else None)
            default = defaults[name]
            shown = "" if default in ("", None, {}, ()) else f" [default: {_show(default)}]"
            bounds = field_range(name)
            limits = f"; {metavar or 'value'}: {bounds}" if bounds else ""
            group.add_argument(
                "--" + name.replace("_", "-"), dest=name, default=None, metavar=metavar,
                action="append" if field_repeatable(name) else "store",
                help=f"{info.description}{limits}{shown} (env {ENV_PREFIX}{name.upper()})"
                .replace("%", "%%"),
            )


def field_range(name: str) -> str:
    """The numeric bounds of a setting in words (``1 to 1000``), or '' when it has none."""
    low = high = ""
    for item in Settings.model_fields[name].metadata:
        for attr, form in (("ge", "{}"), ("gt", "more than {}")):
            if getattr(item, attr, None) is not None:
                low = form.format(_number(getattr(item, attr)))
        for attr, form in (("le", "{}"), ("lt", "less than {}")):
            if getattr(item, attr, None) is not None:
                high = form.format(_number(getattr(item, attr)))
    if low and high:
        return f"{low} to {high}" if not low.startswith("more") else f"{low}, at most {high}"
    return f"at least {low}" if low else (f"at most {high}" if high else "")


def _number(value: Any) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return str(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def settings_from(args: argparse.Namespace, env: Optional[Dict[str, str]] = None) -> Settings:
    """The config file, then env vars, then flags; raises ConfigError naming the option."""
    env = dict(os.environ) if env is None else env
    flags = {name: getattr(args, name) for name in Settings.model_fields
             if getattr(args, name, None) is not None}
    config = getattr(args, "config", None) or env.get(ENV_PREFIX + "CONFIG", "")
    return Settings.load(flags=flags, env=env, file=config)


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    top, commands = _parsers()
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in COMMANDS:
        args_list.insert(0, "serve")
    args, unknown = top.parse_known_args(args_list)
    parser = commands[args.command]
    if unknown:  # named by the command's parser, so the hint points at that command's --help
        parser.error("unrecognized arguments: " + " ".join(unknown))
    if args.command in ("package-lambda", "package-device"):
        from app import package

        try:
            target = package.Target.parse(args.python_version, args.platform)
        except package.TargetError as exc:
            parser.error(f"{exc.option}: {exc}")
        setup_logging()
        build = package.build_lambda_zip if args.command == "package-lambda" else package.build_device_bundle
        return build(args.output, target, args.find_links, args.no_index)
    native = NativeStderr()
    try:
        settings = settings_from(args)
        setup_logging(settings.log_level)
        native.start()
        if args.command == "infer":
            return run_infer(settings, args.frames, args.save)
        return run_serve(settings)
    except (ConfigError, UsageError) as exc:
        parser.error(str(exc))  # exits with 2, as argparse does for its own errors
    finally:
        native.stop()
    return EXIT_USAGE  # not reached: parser.error exits


# -- start-up checks -----------------------------------------------------------------------------
def check_source(settings: Settings) -> None:
    """Refuse what cannot work: an unknown source, an unreadable file or image set, a file that
    is no video or image (text, a FIFO, a device other than a camera), a URL of a scheme not in
    --source-schemes. A camera or stream that is down at start is not refused: the loop retries
    until it is back."""
    from inference.sources import SourceSpecError, default_source, make_source
    from inference.sources.images import ImagesSource
    from inference.sources.video import VideoSource
    from inference.types import SourceError

    try:
        source = make_source(settings.source or default_source(), settings.source_fps,
                             settings.slide_interval, schemes=settings.source_schemes)
        if isinstance(source, ImagesSource) or (isinstance(source, VideoSource) and not source.live):
            source.open()
            try:
                if isinstance(source, VideoSource) and source.read() is None:
                    raise SourceError(f"{source.name!r} holds no decodable frame")
            finally:
                source.close()
    except (SourceSpecError, SourceError) as exc:
        raise UsageError(f"--source: {exc}") from None


def check_tls(settings: Settings) -> None:
    """Refuse a TLS option that cannot work, naming it (uvicorn would fail later)."""
    import ssl

    if settings.ssl_keyfile and not settings.ssl_certfile:
        raise UsageError("--ssl-keyfile: give --ssl-certfile too")
    if not settings.ssl_certfile:
        return
    for option, path in (("--ssl-certfile", settings.ssl_certfile),
                         ("--ssl-keyfile", settings.ssl_keyfile)):
        if path and not Path(path).is_file():
            raise UsageError(f"{option}: file not found: {path}")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            settings.ssl_certfile, settings.ssl_keyfile or None)
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"--ssl-certfile: cannot use {settings.ssl_certfile}: {exc}") from None


def prepared_service(settings: Settings, outputs: bool = True) -> Any:
    """The service with its model loaded and source built, or UsageError naming the option."""
    from inference.outputs.base import OutputError
    from inference.service import Service
    from inference.types import ModelError, SourceError

    check_source(settings)
    try:
        service = Service.build(settings) if outputs else Service(settings)
        service.prepare(strict=True)
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    except ModelError as exc:
        raise UsageError(f"{exc.option}: {exc}") from None
    except SourceError as exc:
        raise UsageError(f"--source: {exc}") from None
    return service


# -- the commands --------------------------------------------------------------------------------
def run_serve(settings: Settings) -> int:
    """Serve until Ctrl-C or SIGTERM: 0; 1 if the port is taken or the server cannot start."""
    from app.server import bind_socket, create_server, log_urls

    try:
        # Before loading anything: a port in use should not cost a model load to find out.
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen: %s", exc.strerror or exc)
        return EXIT_START
    service = None
    server = None
    try:
        check_tls(settings)
        service = prepared_service(settings)
        server = create_server(service)
        port, token = int(sock.getsockname()[1]), server.app.state.token
        server.on_started = lambda: log_urls(settings, port, token, generated=not settings.token)
        service.start()
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C while loading, or a second one during shutdown
        return EXIT_INTERRUPTED if server is None or not server.started else EXIT_OK
    finally:
        if service is not None:
            service.stop(time.monotonic() + 2.0)
        sock.close()
    return EXIT_OK if server is not None and server.started else EXIT_START


def run_infer(settings: Settings, frames: Optional[int] = None, save: Optional[str] = None) -> int:
    """One JSON line per frame on stdout, every frame the loop makes, in order: a folder or glob
    is walked once, file by file, and ends when its files do; ``frames`` (default 10) is an upper
    bound. ``save`` writes each frame as shown (overlay drawn) into that folder.

    Exit 0 once a frame was inferred. 1 (EXIT_START, could not start) when none could be: every
    frame was an error (no camera, a stream down, a model failing on each frame; those results
    are printed all the same), or no frame came for 30 s. 2 for a ``--save`` folder that cannot
    be made or written (UsageError, before anything loads)."""
    import queue
    import threading

    from inference.pipeline.frames import Frame

    save_dir = _save_dir(save) if save is not None else None
    service = prepared_service(settings, outputs=False)
    walked = _walk_once(settings)
    if walked is not None:
        service.capture.replace(walked, opened=False)
    limit = frames if frames is not None else (None if walked is not None else 10)
    # Every published frame, not the newest: an unpaced walk outruns the printing (or saving).
    # A full queue holds the loop up, which here has nobody else to serve.
    made: queue.Queue[Frame] = queue.Queue(maxsize=4)
    done = threading.Event()

    def take(seq: int) -> None:
        frame = service.hub.latest()
        while frame is not None and frame.seq == seq and not done.is_set():
            try:
                made.put(frame, timeout=0.1)
                return
            except queue.Full:
                continue

    service.hub.add_listener(take)
    service.start()
    stopping = _stop_on_hangup()
    seen = inferred = 0
    last_error = ""
    idle = 30.0
    names: Set[str] = set()
    last_frame = time.monotonic()
    try:
        while limit is None or seen < limit:
            try:
                frame = made.get(timeout=0.1)
            except queue.Empty:
                if service.loop.source_ended and made.empty():
                    break  # every file was read, and every frame of it is in
                if time.monotonic() - last_frame > idle:
                    log.error("no frame for %.0f s; giving up", idle)
                    return EXIT_START
                continue
            last_frame = time.monotonic()
            result = frame.result
            line: Dict[str, Any] = {"payload": result.payload(), "result": result.to_json()}
            if save_dir is not None:
                line["saved"] = _save_frame(save_dir, frame, names)
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
            seen += 1
            if result.error is None:
                inferred += 1
            else:
                last_error = result.error
    except KeyboardInterrupt:
        pass
    finally:
        stopping()
        done.set()
        service.stop()
    if seen and not inferred:
        log.error("no frame could be inferred: %d of %d frames failed, the last with: %s",
                  seen, seen, last_error)
        return EXIT_START
    return EXIT_OK


def _stop_on_hangup() -> Any:
    """SIGHUP (a closed terminal or ssh session) and SIGTERM end ``infer`` as Ctrl-C does: the
    service stopped and the exit code its frames earned, not a death by signal. Returns what puts
    the previous handlers back."""
    import signal
    import threading

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, interrupt)
                for sig in (getattr(signal, n) for n in ("SIGHUP", "SIGTERM") if hasattr(signal, n))}
    return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


def _walk_once(settings: Settings) -> Any:
    """The folder or glob ``settings.source`` names as a walk of its files, or None for any other
    source (a single image still repeats, so ``--frames`` can time it)."""
    from inference.sources import default_source, make_source
    from inference.sources.images import ImagesSource

    source = make_source(settings.source or default_source(), settings.source_fps,
                         settings.slide_interval, once=True, schemes=settings.source_schemes)
    return source if isinstance(source, ImagesSource) and source.once else None


def _save_dir(save: str) -> Path:
    """``--save DIR``, made if missing; UsageError naming --save when it cannot be used."""
    path = Path(save).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--save: cannot make the folder {save}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--save: cannot write into {save}")
    return path


def _save_frame(folder: Path, frame: Any, names: Set[str]) -> str:
    """Write ``frame`` as shown (the overlay drawn as on the stream) into ``folder``; the path."""
    import cv2

    origin = frame.result.origin
    if origin is None:
        stem = f"frame-{frame.seq:06d}"
    else:
        stem = Path(origin.name).stem
        if origin.frame is not None:
            stem = f"{stem}-{origin.frame:06d}"
    if stem in names:  # the same file twice (a repeated image, one name in two folders)
        stem = f"{stem}-{frame.seq:06d}"
    names.add(stem)
    path = folder / f"{stem}.jpg"
    if not cv2.imwrite(str(path), frame.image):
        raise UsageError(f"--save: cannot write {path}")
    return str(path)


__all__: List[str] = ["EXIT_OK", "EXIT_START", "EXIT_USAGE", "UsageError", "build_parser", "main",
                      "settings_from"]
