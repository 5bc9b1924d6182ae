"""The Greengrass long-lived Lambda: handler ``lambda_main.lambda_handler``.

As the seed's ``infinite_infer_run()``, importing this module starts everything (the service on
the DeepLens camera and model, with the FIFO, the IoT topic and the dashboard); the handler does
nothing. Unlike the seed, nothing at start ends the function: a bad setting, an output that
cannot work or a model that does not load is logged, published as the seed's ``Error in ...``
message and shown on the dashboard, and the rest runs. SIGTERM stops it all within 2 s.

Settings come from ``DEEPLENS_*`` environment variables and, with ``DEEPLENS_CONFIG``, a TOML
file (a relative path may name a file shipped in the zip).
"""

from __future__ import annotations

from inference.sources.awscam import awscam_available, preload_awscam

preload_awscam()  # the device's cv2 is linked against libraries awscam loads: awscam first

import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

from inference.models.catalog import DEVICE_DEFAULT_MODEL  # noqa: E402
from inference.outputs.base import OutputError  # noqa: E402
from inference.service import Service  # noqa: E402
from inference.settings import ConfigError, Settings  # noqa: E402
from inference.workers import FunctionWorker  # noqa: E402

log = logging.getLogger("lambda_main")

FUNCTION = "deeplens-dashboard Lambda"
STOP_SECONDS = 2.0


def lambda_handler(event: Any, context: Any) -> None:
    """Empty entry point, invoked by Greengrass; the work started at import (the seed's contract)."""
    return None


def load_settings(env: Dict[str, str], errors: List[str]) -> Settings:
    """The device's defaults, the config file, then the env vars; a bad value is dropped (and
    noted in ``errors``) so the function comes up on the rest."""
    base = {"source": "awscam", "model": DEVICE_DEFAULT_MODEL} if awscam_available() else {}
    config = env.pop("DEEPLENS_CONFIG", "")
    if config:
        beside = Path(__file__).resolve().parent / config
        config = config if Path(config).is_absolute() or not beside.is_file() else str(beside)
    while True:  # bounded: each pass drops one bad variable or the file
        try:
            return Settings.load(env=env, file=config, base=base)
        except ConfigError as exc:
            errors.append(str(exc))
            log.error("%s; using the default", exc)
            if exc.origin == "env" and exc.env in env:
                env.pop(exc.env)
            else:
                config = ""


def build_service(settings: Settings, errors: List[str]) -> Service:
    """The service with its outputs; an output that cannot work is turned off, noted."""
    for _ in range(3):
        try:
            return Service.build(settings)
        except OutputError as exc:
            errors.append(str(exc))
            log.error("%s", exc)
            off = {"fifo": "off"} if exc.option == "--fifo" else {"iot": "off"}
            settings = settings.replace(**off)
    return Service(settings)


def _wait_for_stop(stop: threading.Event) -> None:
    stop.wait()


class Function:
    """What the import started; :meth:`stop` ends it (SIGTERM does so within STOP_SECONDS)."""

    def __init__(self) -> None:
        self.errors: List[str] = []
        self.settings = load_settings(dict(os.environ), self.errors)
        refused = len(self.errors)
        self.service = build_service(self.settings, self.errors)
        # Running on a fallback is a fault /health shows, not only a line in the log.
        self.fallbacks = [f"{e}; using the default" for e in self.errors[:refused]] + [
            f"{e}; turned off" for e in self.errors[refused:]]
        self.server: Any = None
        self.keepalive: Optional[FunctionWorker] = None
        self.stopped = threading.Event()

    def start(self) -> None:
        service = self.service
        iot = service.iot
        if iot is not None:
            iot.announce_loading()
        service.prepare(strict=False)
        if service.loop.stats.model_load_error:
            # The loop's own wording, so the frames' identical error is not published twice.
            self.errors.append(f"model not loaded: {service.loop.stats.model_load_error}")
        for message in self.errors:
            if iot is not None:
                iot.report_error(message)
        service.start()
        try:
            from app.server import run_in_thread

            self.server = run_in_thread(service, self.fallbacks)
        except Exception as exc:  # port taken, a broken app: keep the loop, FIFO and IoT going
            log.exception("dashboard not served: %s", exc)
            if iot is not None:
                iot.report_error(f"dashboard not served: {exc}")
            # Without the server's thread nothing would keep the process up between invocations.
            self.keepalive = FunctionWorker("lambda-keepalive", _wait_for_stop, daemon=False)
            self.keepalive.start()

    def wait(self) -> None:
        """Block until stopped (``python lambda_main.py`` runs this way, off Greengrass)."""
        while not self.stopped.wait(1.0):
            pass

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        deadline = time.monotonic() + STOP_SECONDS
        if self.server is not None:
            self.server.stop(deadline)
        if self.keepalive is not None:
            self.keepalive.stop(deadline)
        self.service.stop(deadline)
        log.info("%s stopped", FUNCTION)


def _install_sigterm(function: Function) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
        log.info("SIGTERM: stopping")
        function.stop()
        if not threading.main_thread().is_alive():
            return  # the interpreter is exiting, held only by our threads, now stopped
        # The main thread still runs something (the Greengrass runtime's own loop): hand the
        # signal on, or end the process as SIGTERM means to.
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)


def main() -> Function:
    if not logging.getLogger().handlers:  # Greengrass collects stderr into the function's log
        logging.basicConfig(
            level=getattr(logging, os.environ.get("DEEPLENS_LOG_LEVEL", "info").upper(), logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    function = Function()
    _install_sigterm(function)
    function.start()
    return function


SERVICE = main()

if __name__ == "__main__":
    SERVICE.wait()
