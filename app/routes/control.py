"""The control page and the mutating API: live settings and the pipeline's start/stop/pause/resume."""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from typing_extensions import Literal

from app.broadcast import call_in_thread
from app.routes import PrettyJSONResponse, field_error, runtime_of
from app.security import COOKIE_NAME, authorized, cookie_value, require_control, require_view
from inference import RESOLUTION_NAMES
from inference.config import LIVE_FIELDS, SettingError, validate_changes
from inference.models import BUILTIN, known_model

log = logging.getLogger(__name__)

router = APIRouter(tags=["control"])

MAX_BODY = 16 * 1024
PipelineAction = Literal["start", "stop", "pause", "resume"]


# -- the page ------------------------------------------------------------------------------------
@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(request: Request, token: Optional[str] = None) -> Response:
    settings = request.app.state.settings
    if token is not None:
        if authorized(request, allow_query=True):
            # Trade the link's token for a cookie and drop it from the address bar and history.
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(
                COOKIE_NAME, cookie_value(settings.token), httponly=True, samesite="strict",
                secure=request.url.scheme == "https", path="/",
            )
            return response
        return _render(request, status=401, notice="The token in this link is not valid: "
                       "controls stay read-only. Open the control URL printed at start.")
    if settings.protect_views and not authorized(request):
        return _render(request, status=401, notice="This dashboard is protected: open the control "
                       "URL printed at start (…/?token=…).", locked=True)
    return _render(request)


def _render(request: Request, status: int = 200, notice: str = "", locked: bool = False) -> Response:
    runtime = runtime_of(request)
    context: dict[str, Any] = {
        "can_control": authorized(request),
        "locked": locked,
        "notice": notice,
        "settings": runtime.settings.public(),
        "models": BUILTIN,
        "resolutions": RESOLUTION_NAMES,
        "state": runtime.loop.state.value,
    }
    # Rendered with Jinja2 itself: Starlette's TemplateResponse changed its signature between
    # the releases Python 3.7 gets and the current ones.
    html = request.app.state.templates.get_template("index.html").render(request=request, **context)
    response: Response = HTMLResponse(html, status_code=status)
    response.headers["Cache-Control"] = "no-store"
    return response


# -- settings ------------------------------------------------------------------------------------
_CONFIG_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {
            "type": "object",
            "description": "Live settings to change: " + ", ".join(sorted(LIVE_FIELDS)),
            "example": {"threshold": 0.3, "top_k": 3},
        }}},
    }
}


@router.get("/api/config", response_class=PrettyJSONResponse, dependencies=[Depends(require_view)],
            summary="The current settings (secrets masked)")
async def get_config(request: Request) -> PrettyJSONResponse:
    return PrettyJSONResponse(runtime_of(request).settings.public())


@router.patch(
    "/api/config", response_class=PrettyJSONResponse, dependencies=[Depends(require_control)],
    openapi_extra=_CONFIG_BODY, summary="Change live settings (all or nothing)",
    responses={401: {"description": "No or wrong token"}, 403: {"description": "Cross-origin"},
               413: {"description": "Body too large"}, 422: {"description": "A bad value"}},
)
async def patch_config(request: Request) -> Response:
    """A JSON object of live settings. A bad value answers 422 naming the field and changes
    nothing; a model or source that fails to load answers 422 with its error and the running one
    stays."""
    body = await _read_body(request)
    if isinstance(body, Response):
        return body
    try:
        changes = validate_changes(body)
    except SettingError as exc:
        return field_error(exc.field, exc.message)
    model = changes.get("model")
    if model and not known_model(model):
        return field_error("model", f"--model: unknown model {model!r}: give a built-in one "
                           f"({', '.join(BUILTIN)}) or an existing model file")
    runtime = runtime_of(request)
    async with request.app.state.config_lock:
        try:
            # Loading a model or opening a camera blocks for a while: not on the event loop.
            settings = await call_in_thread("settings-apply", runtime.apply, changes)
        except Exception as exc:
            field = _blame(exc, changes)
            log.warning("settings change refused (%s): %s", field, exc)
            return field_error(field, str(exc) or type(exc).__name__)
    log.info("settings changed: %s", ", ".join(sorted(changes)) or "nothing")
    return PrettyJSONResponse(settings.public())


async def _read_body(request: Request) -> dict[str, Any] | Response:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        return _too_large()
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            return _too_large()
    try:
        body = json.loads(bytes(data) or b"null")
    except ValueError as exc:
        return field_error("", f"the body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return field_error("", "the body must be a JSON object of settings, e.g. {\"threshold\": 0.5}")
    return body


def _too_large() -> Response:
    return PrettyJSONResponse({"detail": f"request body larger than {MAX_BODY} bytes"}, status_code=413)


def _blame(exc: Exception, changes: dict[str, Any]) -> str:
    """The field a failed apply is about: a model error names its option, a source error the source."""
    from inference.sources import SourceSpecError
    from inference.types import ModelError, SourceError

    if isinstance(exc, ModelError):
        name = exc.option[2:].replace("-", "_")
        return name if name in changes else "model"
    if isinstance(exc, (SourceError, SourceSpecError)) and "source" in changes:
        return "source"
    for field in ("model", "source"):
        if field in changes:
            return field
    return next(iter(changes), "")


# -- the pipeline --------------------------------------------------------------------------------
@router.post(
    "/api/pipeline/{action}", response_class=PrettyJSONResponse,
    dependencies=[Depends(require_control)], summary="start | stop | pause | resume the loop",
    responses={401: {"description": "No or wrong token"}, 403: {"description": "Cross-origin"}},
)
async def pipeline(request: Request, action: PipelineAction) -> PrettyJSONResponse:
    loop = runtime_of(request).loop
    if action == "start":
        await call_in_thread("pipeline-start", loop.start)
    elif action == "stop":
        await call_in_thread("pipeline-stop", loop.stop)  # joins the loop thread: up to 2 s
    elif action == "pause":
        loop.pause()
    else:
        loop.resume()
    log.info("pipeline %s -> %s", action, loop.state.value)
    return PrettyJSONResponse({"action": action, "state": loop.state.value})
