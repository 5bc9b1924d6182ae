"""The Greengrass long-lived Lambda: handler ``lambda_main.lambda_handler``.

As the seed's ``infinite_infer_run()``, importing this module starts everything: the inference
loop on the DeepLens camera (``awscam``) and the device's model, the project-stream FIFO, the IoT
topic and, beyond the seed, the dashboard. The handler itself does nothing.

Unlike the seed, a failure at start (a missing model artifact, an ``mo.optimize`` error, a bad
setting) does not end the function: it is logged and published on the IoT topic as the seed's
``Error in ...`` message, and the dashboard comes up showing it. Import returns once the server
is bound; its non-daemon thread keeps the process alive, and SIGTERM stops it all cleanly.

Settings come from ``DEEPLENS_*`` environment variables (the Lambda's environment in the console).
"""

from __future__ import annotations

# The device's cv2 is linked against libraries awscam loads: awscam must be imported first.
try:
    import awscam  # noqa: F401
except ImportError:  # off the device: a video file, webcam or the demo stands in
    AWSCAM = False
else:
    AWSCAM = True

import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from inference.config import SettingError, Settings, from_env
from inference.runtime import Runtime, build_runtime

log = logging.getLogger("lambda_main")

FUNCTION = "deeplens-dashboard lambda"
STOP_SECONDS = 2.0


def lambda_handler(event: Any, context: Any) -> None:
    """Empty entry point, invoked by Greengrass; the work started at import (the seed's contract)."""
    return None


class Service:
    """What the import started; ``stop()`` ends it (SIGTERM does so within STOP_SECONDS)."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.runtime: Runtime | None = None
        self.server: Any = None  # app.server.ServerThread
        self.errors: list[str] = []
        self._stopped = threading.Event()
        self._keepalive: threading.Thread | None = None

    # -- start -----------------------------------------------------------------------------------
    def start(self) -> None:
        self.settings = self._settings()
        runtime = self._runtime()
        self.runtime = runtime
        iot = self.iot
        for message in self.errors:
            if iot is not None:
                iot.error(FUNCTION, message)
        # strict=False: a model that cannot load is kept as an error shown on every frame (and
        # published by the IoT output) instead of killing the function as the seed did.
        try:
            runtime.prepare(strict=False)
        except Exception as exc:  # prepare(strict=False) only raises on a bug; still come up
            log.exception("preparing the runtime failed")
            if iot is not None:
                iot.error(FUNCTION, exc)
        load_error = runtime.loop.stats.model_load_error
        if load_error:
            log.error("model not loaded: %s", load_error)
        self._serve(runtime)

    def _settings(self) -> Settings:
        base = Settings()
        if AWSCAM:
            from inference.models import DEVICE_DEFAULT_MODEL

            base = base.replace(source="awscam", model=DEVICE_DEFAULT_MODEL)
        env = dict(os.environ)
        while True:  # bounded: each pass removes one bad variable
            try:
                return from_env(base, env)
            except SettingError as exc:
                # No CLI to exit 2 from: log it, publish it, and run on the default instead.
                self.errors.append(exc.message)
                log.error("%s; using the default", exc.message)
                env.pop("DEEPLENS_" + exc.field.upper(), None)

    def _runtime(self) -> Runtime:
        from inference.outputs import OutputError

        settings = self.settings
        for _ in range(3):
            try:
                return build_runtime(settings)
            except OutputError as exc:
                self.errors.append(str(exc))
                log.error("%s", exc)
                if exc.option == "--fifo":
                    settings = settings.replace(fifo="off")
                elif settings.iot not in ("auto", "off") or settings.mqtt:
                    settings = settings.replace(iot="auto", mqtt="")
                else:
                    settings = settings.replace(iot="off")
        self.settings = settings
        return build_runtime(settings.replace(fifo="off", iot="off"))

    def _serve(self, runtime: Runtime) -> None:
        try:
            from app.server import run_in_thread

            self.server = run_in_thread(runtime, self.settings)
            return
        except Exception as exc:  # port taken, a broken app: keep the loop, FIFO and IoT going
            message = f"dashboard not served: {exc}"
            self.errors.append(message)
            log.exception("%s", message)
            iot = self.iot
            if iot is not None:
                iot.error(FUNCTION, message)
        runtime.start()
        # Without the server's thread nothing would keep the process up between invocations.
        self._keepalive = threading.Thread(target=self._wait, name="lambda-keepalive", daemon=False)
        self._keepalive.start()

    def _wait(self) -> None:
        while not self._stopped.wait(1.0):
            pass

    @property
    def iot(self) -> Any:
        runtime = self.runtime
        if runtime is None:
            return None
        return next((o for o in runtime.outputs if o.name == "iot"), None)

    # -- stop ------------------------------------------------------------------------------------
    def stop(self, timeout: float = STOP_SECONDS) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        deadline = time.monotonic() + timeout
        if self.server is not None:
            try:
                self.server.stop(max(0.1, timeout * 0.5))
            except Exception:
                log.exception("stopping the dashboard server failed")
        if self.runtime is not None:
            self.runtime.stop(max(0.1, deadline - time.monotonic()))
        log.info("%s stopped", FUNCTION)


def _setup_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:  # Greengrass collects stdout/stderr into the function's log
        logging.basicConfig(
            level=getattr(logging, level.upper(), logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )


def _install_sigterm(service: Service) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        log.info("SIGTERM: stopping")
        service.stop()

    signal.signal(signal.SIGTERM, on_sigterm)


def main() -> Service:
    _setup_logging(os.environ.get("DEEPLENS_LOG_LEVEL", "info"))
    service = Service()
    _install_sigterm(service)
    service.start()
    return service


SERVICE = main()
