"""The FastAPI app: ``create_app(service)``. Its lifespan runs the web side only (the broadcaster
that fans frames out to viewers); the service is started and stopped by whoever owns it (the
CLI, the Lambda, a test)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, List, Optional

import jinja2
from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import RedirectResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import StreamingResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.broadcast import Broadcaster
from app.limits import BodyLimit
from app.routes import control, events, field_error, health, results, stream
from app.routes.health import make_registry
from app.security import LoginThrottle, SecurityHeaders, new_token
from inference.affinity import serving_thread
from inference.compat import package_version
from inference.service import Service

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STOP_SECONDS = 1.0


class LowercaseHost:
    """The Host header in lower case: host names are case-insensitive (RFC 9110), and the
    TrustedHostMiddleware of the Starlette that Python 3.7 gets compares them as sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = [(k, v.lower()) if k == b"host" else (k, v) for k, v in scope["headers"]]
            scope = dict(scope, headers=headers)
        await self.app(scope, receive, send)


def create_app(service: Service, token: Optional[str] = None, fallbacks: Sequence[str] = ()) -> FastAPI:
    """The dashboard of ``service``. The control token is ``token``, else ``--token``, else a
    fresh one (``app.state.token``: the CLI logs it once). ``fallbacks``: settings the owner
    could not use and what runs instead, shown as faults in /health."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The event loop serves every viewer: off the loop's CPU, at the process's priority.
        serving_thread(0)
        broadcaster = Broadcaster(service.hub, asyncio.get_running_loop(),
                                  nice=service.settings.serving_nice)
        broadcaster.attach()
        app.state.broadcaster = broadcaster
        try:
            yield
        finally:
            broadcaster.close()
            broadcaster.detach(time.monotonic() + STOP_SECONDS)

    app = _fastapi(
        title="DeepLens dashboard",
        version=package_version("deeplens-dashboard"),
        description="Live camera inference: MJPEG stream, results, control. Mutating endpoints "
        "need the control token (Authorization: Bearer TOKEN).",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.token = token or service.settings.token or new_token()
    app.state.throttle = LoginThrottle()
    app.state.fallbacks = list(fallbacks)
    app.state.registry = make_registry(service, app.state)
    app.state.templates = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True)
    app.include_router(stream.router)
    app.include_router(results.router)
    app.include_router(control.router)
    app.include_router(health.router)
    app.include_router(events.router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.add_middleware(BodyLimit)
    app.add_middleware(HeadAsGet)
    hosts = [h for h in service.settings.allowed_hosts.split(",") if h]
    if hosts and "*" not in hosts:
        # A page that re-points its own name at the device (DNS rebinding) sends that name as
        # Host: only the names given are served. No www. redirect: a device has no www twin.
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)
        app.add_middleware(LowercaseHost)  # runs before it
    # Outermost, so every answer has them, the refusals of the layers above included.
    app.add_middleware(SecurityHeaders, inline_script_paths=(DOCS_URL, f"{DOCS_URL}/oauth2-redirect"))
    app.add_exception_handler(HTTPException, _body_not_text)
    return app


DOCS_URL = "/docs"
DOCS_ASSETS = "/docs-assets"


def _fastapi(**kwargs: Any) -> FastAPI:
    """The app, with /docs (Swagger UI) and /redoc served from assets installed with the product:
    FastAPI's own pages load them and their fonts from CDNs, blank on a device without internet."""
    try:
        from fastapi_offline import FastAPIOffline
    except ImportError:  # an install without it still serves everything but the docs' looks
        log.warning("fastapi-offline is not installed: /docs and /redoc need internet access")
        return FastAPI(**kwargs)
    app = FastAPIOffline(docs_url=DOCS_URL, static_url=DOCS_ASSETS, redoc_url=None, **kwargs)

    # One docs page: ReDoc's bundle fetches its footer logo from its vendor's CDN on every view
    # (a request off the device, failing offline), and Swagger UI also lets one try the API.
    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> RedirectResponse:
        return RedirectResponse(f"{request.scope.get('root_path', '')}/docs")

    return app


def _get_routes(routes: Iterable[BaseRoute]) -> Iterator[APIRoute]:
    """Every GET route whose answer ends (not a stream), into included routers too (FastAPI
    >= 0.16x keeps an included router as a route of its own; older ones flatten it)."""
    for route in routes:
        if isinstance(route, APIRoute) and "GET" in (route.methods or ()):
            response_class = route.response_class
            if not (isinstance(response_class, type) and issubclass(response_class, StreamingResponse)):
                yield route
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _get_routes(inner.routes)


class HeadAsGet:
    """HEAD on any GET endpoint that is not a stream: the GET's status and headers, no body.

    FastAPI's routes answer only the methods they declare (405 to HEAD), and declaring HEAD on
    each would double every operation in /openapi.json; uptime monitors use HEAD. A stream has
    no end to take headers from, so its HEAD stays a 405. Routes that take HEAD themselves
    (Starlette's: /docs, /openapi.json, /static) are left to it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._routes: Optional[List[APIRoute]] = None  # the app's routes are final by the first HEAD

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        if self._routes is None:
            self._routes = list(_get_routes(getattr(scope.get("app"), "routes", ())))
        as_get = {**scope, "method": "GET"}
        if not any(r.matches(as_get)[0] is Match.FULL for r in self._routes):
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(as_get, receive, without_body)


async def _body_not_text(request: Request, exc: Exception) -> Response:
    """A JSON body that is not UTF-8 is a 422 naming the body, as any other body that is not
    JSON: FastAPI answers it with a bare "400 There was an error parsing the body"."""
    assert isinstance(exc, HTTPException)
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, UnicodeDecodeError):
        return field_error("", f"the body is not valid JSON: not UTF-8 ({cause.reason} at byte "
                           f"{cause.start})")
    return await http_exception_handler(request, exc)


def begin_shutdown(app: FastAPI) -> None:
    """End every open stream now (called on the event loop as the server starts shutting down):
    uvicorn waits for open responses before it runs the lifespan's own shutdown."""
    broadcaster: Optional[Broadcaster] = getattr(app.state, "broadcaster", None)
    if broadcaster is not None:
        broadcaster.close()
