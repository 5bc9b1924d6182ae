"""The FastAPI app: ``create_app(runtime, settings)``; its lifespan starts and stops the runtime."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import jinja2
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.broadcast import Broadcaster, call_in_thread
from app.routes import control, health, results, stream
from app.routes.health import ModelErrorWatch, make_registry
from app.security import ensure_token
from inference.affinity import serving_thread
from inference.config import Settings
from inference.runtime import Runtime

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
VERSION = "0.1.0"


def create_app(runtime: Runtime, settings: Settings) -> FastAPI:
    """The dashboard for ``runtime``; ``settings`` gives the server options (token, views, cap).

    Without a token one is generated, which nobody knows: serve()/run_in_thread() generate and
    log it before calling this.
    """
    settings = ensure_token(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The event loop serves every viewer: off the loop's CPU, at the process's priority.
        serving_thread(0)
        broadcaster = Broadcaster(runtime.hub, asyncio.get_running_loop(),
                                  nice=runtime.settings.serving_nice)
        broadcaster.attach()
        app.state.broadcaster = broadcaster
        try:
            # Starting may load a model and open a camera: keep the event loop free.
            await call_in_thread("runtime-start", runtime.start)
            yield
        finally:
            broadcaster.close()
            await call_in_thread("runtime-stop", runtime.stop)
            broadcaster.detach()

    app = FastAPI(
        title="DeepLens dashboard",
        version=VERSION,
        description="Live camera inference: MJPEG stream, results, control. Mutating endpoints "
        "need the control token (Authorization: Bearer TOKEN).",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.settings = settings
    app.state.config_lock = asyncio.Lock()
    app.state.model_watch = ModelErrorWatch()
    app.state.registry = make_registry(runtime, app.state)
    app.state.templates = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True)
    app.include_router(stream.router)
    app.include_router(results.router)
    app.include_router(control.router)
    app.include_router(health.router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    return app


def begin_shutdown(app: FastAPI) -> None:
    """End every open stream now (called on the event loop as the server starts shutting down):
    uvicorn waits for open responses before it runs the lifespan's own shutdown."""
    broadcaster: Broadcaster | None = getattr(app.state, "broadcaster", None)
    if broadcaster is not None:
        broadcaster.close()
