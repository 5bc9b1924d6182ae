"""The Greengrass long-lived Lambda: handler ``lambda_main.lambda_handler``.

As the seed's ``infinite_infer_run()``, importing this module starts everything: the inference
loop on the DeepLens camera (``awscam``) and the device's model, the project-stream FIFO, the IoT
topic and, beyond the seed, the dashboard. The handler itself does nothing.

Unlike the seed, a failure at start (a missing model artifact, an ``mo.optimize`` error, a bad
setting) does not end the function: it is logged and published on the IoT topic as the seed's
``Error in ...`` message, and the dashboard comes up showing it. Import returns once the server
is bound; its non-daemon thread keeps the process alive, and SIGTERM stops it all cleanly.

Settings come from ``DEEPLENS_*`` environment variables (the Lambda's environment in the console)
and, with ``DEEPLENS_CONFIG``, a TOML file (a relative path may name a file shipped in the zip).
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
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from inference.config import SettingError, Settings, from_env, from_file
from inference.runtime import Runtime, build_runtime

if TYPE_CHECKING:
    from app.server import ServerThread
    from inference.outputs.iot import IotOutput

log = logging.getLogger("lambda_main")

FUNCTION = "deeplens-dashboard Lambda"
STOP_SECONDS = 2.0


def lambda_handler(event: Any, context: Any) -> None:
    """Empty entry point, invoked by Greengrass; the work started at import (the seed's contract)."""
    return None


class Service:
    """What the import started; ``stop()`` ends it (SIGTERM does so within STOP_SECONDS)."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.runtime: Runtime | None = None
        self.server: ServerThread | None = None
        self.errors: list[str] = []
        self._stopped = threading.Event()
        self._keepalive: threading.Thread | None = None

    # -- start -----------------------------------------------------------------------------------
    def start(self) -> None:
        self.settings = self._settings()
        runtime = self._runtime()
        self.runtime = runtime
        for message in self.errors:
            self._publish_error(message)
        iot = self.iot
        if iot is not None:
            iot.announce_loading()
        # strict=False: a model that cannot load is kept as an error shown on every frame (and
        # on /health) instead of ending the function as the seed did.
        try:
            runtime.prepare(strict=False)
        except Exception as exc:  # prepare(strict=False) only raises on a bug; still come up
            log.exception("preparing the runtime failed")
            self._publish_error(str(exc))
        load_error = runtime.loop.stats.model_load_error
        if load_error:
            # The loop's own wording, so the frames' identical error is not published twice.
            self._publish_error(f"model not loaded: {load_error}")
        self._serve(runtime)

    def _publish_error(self, message: str) -> None:
        iot = self.iot
        if iot is not None:
            iot.report_error(message)

    def _settings(self) -> Settings:
        base = Settings()
        if AWSCAM:
            from inference.models import DEVICE_DEFAULT_MODEL

            base = base.replace(source="awscam", model=DEVICE_DEFAULT_MODEL)
        env = dict(os.environ)
        config = env.pop("DEEPLENS_CONFIG", "")
        if config:
            # A TOML file shipped in the zip may be named relative to this module.
            beside = Path(__file__).resolve().parent / config
            path = config if Path(config).is_absolute() or not beside.is_file() else str(beside)
            try:
                base = from_file(path, base)
            except SettingError as exc:
                self.errors.append(exc.message)
                log.error("%s; the file is ignored", exc.message)
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
            self._publish_error(message)
        runtime.start()
        # Without the server's thread nothing would keep the process up between invocations.
        self._keepalive = threading.Thread(target=self.wait, name="lambda-keepalive", daemon=False)
        self._keepalive.start()

    def wait(self) -> None:
        """Block until stopped (``python lambda_main.py`` runs this way, off Greengrass)."""
        while not self._stopped.wait(1.0):
            pass

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    @property
    def iot(self) -> IotOutput | None:
        from inference.outputs.iot import IotOutput

        runtime = self.runtime
        if runtime is None:
            return None
        return next((o for o in runtime.outputs if isinstance(o, IotOutput)), None)

    # -- stop ------------------------------------------------------------------------------------
    def stop(self, timeout: float = STOP_SECONDS) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        deadline = time.monotonic() + timeout
        if self.server is not None:
            try:
                # ServerThread.stop may add a second for a forced exit: keep within the budget.
                self.server.stop(timeout * 0.3)
            except Exception:
                log.exception("stopping the dashboard server failed")
        if self.runtime is not None:
            # The app's lifespan stops the runtime too; stopping twice is harmless.
            self.runtime.stop(max(0.2, deadline - time.monotonic()))
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
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        log.info("SIGTERM: stopping")
        service.stop()
        if not threading.main_thread().is_alive():
            return  # the interpreter is exiting, held only by our threads, now stopped
        # The main thread still runs something (the Greengrass runtime's own loop): hand the
        # signal on, or end the process as SIGTERM means to.
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)


def main() -> Service:
    _setup_logging(os.environ.get("DEEPLENS_LOG_LEVEL", "info"))
    service = Service()
    _install_sigterm(service)
    service.start()
    return service


SERVICE = main()

if __name__ == "__main__":
    SERVICE.wait()
