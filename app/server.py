"""Serving the app with uvicorn: in the CLI's main thread or in a thread (the Greengrass Lambda).

We bind the listening socket ourselves so a port in use is a clear error before anything starts,
and a server thread can report "bound" to its caller. Open MJPEG/SSE streams never end on their
own, and uvicorn's graceful shutdown waits for them, so :class:`DashboardServer` tells the app to
end its streams as the first step of shutting down. Each connection goes through
:mod:`app.edge` (head size, head timeout, a cap on open connections) before the app sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from types import FrameType
from typing import Optional

import uvicorn
from fastapi import FastAPI

from app.edge import Edge, EdgeLimits
from app.main import begin_shutdown, create_app
from app.security import RedactTokens, TokenFileError, default_token_file, keep_token, new_token
from inference.service import Service
from inference.settings import Settings

log = logging.getLogger("app")

SEND_BUFFER = 256 * 1024
# uvicorn cancels whatever request task is still running after this many seconds of shutdown;
# our streams end well before (they watch the shutdown), this only bounds a stuck handler.
GRACEFUL_SECONDS = 1

# SIGHUP too: a closed terminal or session (ssh, tmux, nohup-less runs) sends it, and its default
# kills the process with no graceful stop (the last IoT result and the FIFO's end lost).
HANDLED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                        if hasattr(signal, name))

__all__ = ["DashboardServer", "PortInUseError", "ServerThread", "bind_socket", "create_server",
           "log_urls", "run_in_thread"]


class PortInUseError(OSError):
    pass


class DashboardServer(uvicorn.Server):
    """uvicorn.Server that ends the app's streams first on shutdown and keeps signals to itself."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, edge: Optional[Edge] = None) -> None:
        super().__init__(config)
        self.app = app
        self.edge = edge
        self.bound = threading.Event()
        self.on_started: Callable[[], None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.edge is not None:
            self.edge.start()  # the cap counts what the service has open by now
        await super().startup(sockets)
        if self.started:
            self.bound.set()
            if self.on_started is not None:
                self.on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        begin_shutdown(self.app)
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the captured signal after a graceful stop, which turns Ctrl-C into a
        # KeyboardInterrupt traceback and SIGTERM into a signal death; we want exit code 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def install_signal_handlers(self) -> None:
        # uvicorn < 0.29 (the device's 0.22) has no capture_signals and calls this instead.
        install = getattr(super(), "install_signal_handlers", None)
        if install is None or threading.current_thread() is not threading.main_thread():
            return
        install()
        loop = asyncio.get_event_loop()
        for sig in HANDLED_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig, None)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def _uvicorn_config(app: FastAPI, settings: Settings, edge: Edge) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=edge.protocol_class(),
        timeout_keep_alive=edge.limits.keep_alive,
        host=settings.host,
        port=settings.port,
        ssl_certfile=settings.ssl_certfile or None,
        ssl_keyfile=settings.ssl_keyfile or None,
        log_level=settings.log_level,
        # One line per request would flood a device log (the page polls); debug shows them.
        access_log=settings.log_level == "debug",
        log_config=None,  # our handlers (app.cli.setup_logging), not uvicorn's own
        lifespan="on",
        # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: any local process could
        # then pick the client address the login throttle counts by (app.security).
        proxy_headers=False,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
    )


def create_server(service: Service, fallbacks: Sequence[str] = (),
                  limits: Optional[EdgeLimits] = None) -> DashboardServer:
    """The uvicorn server of ``service``'s dashboard; its token is ``server.app.state.token``;
    ``fallbacks`` as in :func:`create_app`; ``limits`` on connections (:mod:`app.edge`), its
    counts in ``server.app.state.edge``."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactTokens) for f in access.filters):
        access.addFilter(RedactTokens())
    app = create_app(service, token=control_token(service.settings), fallbacks=fallbacks)
    edge = Edge(limits or EdgeLimits())
    app.state.edge = edge
    return DashboardServer(_uvicorn_config(app, service.settings, edge), app, edge)


def control_token(settings: Settings) -> str:
    """``--token``; else the one kept in ``--token-file`` (made at the first start), so a
    bookmarked control URL and an open page survive a restart; else one for this run."""
    if settings.token:
        return settings.token
    if settings.token_file.lower() == "off":
        return new_token()
    path = Path(settings.token_file).expanduser() if settings.token_file else default_token_file()
    try:
        token, made = keep_token(path)
    except TokenFileError as exc:
        log.error("control token: %s; using a new token for this run only", exc)
        return new_token()
    log.info("control token %s %s (delete it for a new token)",
             "kept in" if made else "read from", path)
    return token


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port; PortInUseError with a plain message if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY) only on accepted
    # sockets whose proto says TCP. With Nagle on, a response written as headers then body waited
    # for the client's delayed ACK: /results took 44 ms instead of ~2 (bench/results_load.py).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # Lets a restarted dashboard take the port while old connections sit in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit this. Autotuning lets a slow viewer's kernel buffer grow to MBs,
    # i.e. seconds of stale 720p frames queued below us; a bounded buffer keeps it ~5 frames
    # behind at worst, so it skips to the latest instead (still far above a LAN's bandwidth-delay).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(
                exc.errno,
                f"port {port} on {host} is already in use (another dashboard?); stop it or "
                f"choose another with --port",
            ) from None
        raise
    sock.set_inheritable(True)
    return sock


def _scheme(settings: Settings) -> str:
    return "https" if settings.ssl_certfile else "http"


class ServerThread:
    """A uvicorn server in a named, non-daemon thread "http-server" that the owner stops."""

    def __init__(self, server: DashboardServer) -> None:
        self.server = server
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._error: BaseException | None = None
        self.host = server.config.host
        self.port = server.config.port

    @property
    def started(self) -> bool:
        return self.server.bound.is_set() and self._thread is not None and self._thread.is_alive()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.server.config.ssl_certfile else "http"
        return f"{scheme}://{host}:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        """Bind, start the thread and return once the server accepts connections (lifespan done)."""
        if self._thread is not None:
            raise RuntimeError("server thread already started")
        self._sock = bind_socket(self.host, self.port)
        self.port = int(self._sock.getsockname()[1])
        self._thread = threading.Thread(target=self._run, name="http-server", daemon=False)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.bound.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"the dashboard server did not start: {self._error!r}")

    def _run(self) -> None:
        assert self._sock is not None
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as exc:  # SystemExit from a failed lifespan ends only this thread
            self._error = exc
            log.error("dashboard server stopped with an error: %r", exc)

    def stop(self, deadline: Optional[float] = None) -> None:
        """Stop serving by ``deadline`` (default in 2 s): gracefully, then by force for the
        last 0.3 s."""
        deadline = time.monotonic() + 2.0 if deadline is None else deadline
        thread = self._thread
        self.server.should_exit = True
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - 0.3 - time.monotonic()))
            if thread.is_alive():
                self.server.force_exit = True
                thread.join(max(0.1, deadline - time.monotonic()))
                if thread.is_alive():
                    log.warning("dashboard server thread still running after stop")
        if self._sock is not None:
            self._sock.close()


def run_in_thread(service: Service, fallbacks: Sequence[str] = ()) -> ServerThread:
    """Serve in a background thread (the Greengrass Lambda); returns once the port is bound."""
    thread = ServerThread(create_server(service, fallbacks))
    thread.start()
    log_urls(service.settings, thread.port, thread.server.app.state.token,
             generated=not service.settings.token)
    return thread


def local_ipv4() -> list[str]:
    """The machine's IPv4 addresses, for the URLs to print (best effort, no extra packages)."""
    found: list[str] = []
    try:
        import fcntl
        import struct

        siocgifaddr = 0x8915
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name[:15].encode()))
                except OSError:
                    continue  # interface without an IPv4 address
                found.append(socket.inet_ntoa(packed[20:24]))
    except (ImportError, OSError):
        pass
    if not found:
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it picks the route
            found.append(str(s.getsockname()[0]))
    found = sorted(set(found), key=lambda a: (a.startswith("127."), a))
    return found or ["127.0.0.1"]


def dashboard_urls(settings: Settings, port: int) -> list[str]:
    hosts = local_ipv4() if settings.host in ("0.0.0.0", "::", "") else [settings.host]
    return [f"{_scheme(settings)}://{h if ':' not in h else f'[{h}]'}:{port}/" for h in hosts]


def log_urls(settings: Settings, port: int, token: str, generated: bool = True) -> None:
    urls = dashboard_urls(settings, port)
    log.info("dashboard: %s", "  ".join(urls))
    if generated:
        # The one place the token is ever written out, as Jupyter does.
        log.info("control (opens with the control token): %s?token=%s", urls[0], token)
    else:
        log.info("control: open %s?token=<your --token> once in the browser", urls[0])
