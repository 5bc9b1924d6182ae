"""The control page and the mutating API: live settings and the pipeline's start/stop/pause/resume."""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Optional, Tuple

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from typing_extensions import Literal

from app.broadcast import call_in_thread
from app.deps import ControlDep, ServiceDep, ViewDep
from app.routes import PrettyJSONResponse, field_error
from app.security import CLEAR_COOKIE, COOKIE_MAX_AGE, COOKIE_NAME, authorized, cookie_value, stale_cookie
from inference import RESOLUTION_NAMES
from inference.models.catalog import BUILTIN, known_model
from inference.pipeline.loop import LoopState
from inference.service import PipelineActionError, Service
from inference.settings import ConfigError, ConfigPatch

log = logging.getLogger(__name__)

router = APIRouter(tags=["control"])

PipelineAction = Literal["start", "stop", "pause", "resume"]

# The actions that change each state: the buttons the page enables. (Repeating one whose state
# is already reached is a harmless 200, but no button offers it.)
OFFERED: Dict[LoopState, List[str]] = {
    LoopState.STOPPED: ["start"],
    LoopState.RUNNING: ["pause", "stop"],
    LoopState.PAUSED: ["resume", "stop"],
}


def pipeline_state(service: Service) -> Dict[str, Any]:
    state = service.state
    return {"state": state.value, "actions": OFFERED[state]}


def control_events(service: Service) -> bytes:
    """The SSE ``config`` (as ``GET /api/config``) and ``state`` events: what an open page's
    controls and buttons must show, sent at connect and after each change."""
    config = json.dumps(service.settings.public(), separators=(",", ":"))
    state = json.dumps(pipeline_state(service), separators=(",", ":"))
    return f"event: config\ndata: {config}\n\nevent: state\ndata: {state}\n\n".encode()


# -- the page ------------------------------------------------------------------------------------
@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(request: Request, service: ServiceDep, token: Optional[str] = None) -> Response:
    if token is not None:
        if authorized(request, allow_query=True):
            # Trade the link's token for a cookie and drop it from the address bar and history.
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(
                COOKIE_NAME, cookie_value(request.app.state.token), max_age=COOKIE_MAX_AGE,
                httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/",
            )
            return response
        return _render(request, status=401, notice="The token in this link is not valid: "
                       "controls stay read-only. Open the control URL printed at start.")
    if service.settings.protect_views and not authorized(request):
        return _render(request, status=401, notice="This dashboard is protected: open the control "
                       "URL printed at start (…/?token=…).", locked=True)
    return _render(request)


def _render(request: Request, status: int = 200, notice: str = "", locked: bool = False) -> Response:
    service = request.app.state.service
    context: Dict[str, Any] = {
        "can_control": authorized(request),
        "locked": locked,
        "notice": notice,
        "settings": service.settings.public(),
        "models": BUILTIN,
        "resolutions": RESOLUTION_NAMES,
        "state": service.state.value,
        "actions": OFFERED[service.state],
    }
    # Rendered with Jinja2 itself: Starlette's TemplateResponse changed its signature between
    # the releases Python 3.7 gets and the current ones.
    html = request.app.state.templates.get_template("index.html").render(request=request, **context)
    response: Response = HTMLResponse(html, status_code=status)
    response.headers["Cache-Control"] = "no-store"
    if stale_cookie(request):
        response.headers["Set-Cookie"] = CLEAR_COOKIE
    return response


# -- settings ------------------------------------------------------------------------------------
@router.get("/api/config", response_class=PrettyJSONResponse, dependencies=[ViewDep],
            summary="The current settings (secrets masked)")
async def get_config(service: ServiceDep) -> PrettyJSONResponse:
    return PrettyJSONResponse(service.settings.public())


@router.patch(
    "/api/config", response_class=PrettyJSONResponse, dependencies=[ControlDep],
    summary="Change live settings (all or nothing)",
    responses={401: {"description": "No or wrong token"}, 403: {"description": "Cross-origin"},
               413: {"description": "Body too large"}, 422: {"description": "A bad value"}},
)
async def patch_config(body: ConfigPatch, service: ServiceDep) -> Response:
    """Live settings to change. A bad value answers 422 naming the field and changes nothing; a
    model or source that fails to load answers 422 with its error and the running one stays."""
    changes = body.model_dump(exclude_unset=True)
    model = changes.get("model")
    if model and not known_model(model):
        return field_error("model", f"--model: unknown model {model!r}: give a built-in one "
                           f"({', '.join(BUILTIN)}) or an existing model file")
    try:
        # Loading a model or opening a camera blocks for a while: not on the event loop.
        settings = await call_in_thread("settings-apply", service.apply, changes)
    except ConfigError as exc:
        return field_error(exc.field, exc.message)
    except Exception as exc:
        field = _blame(exc, changes)
        log.warning("settings change refused (%s): %s", field, exc)
        return field_error(field, str(exc) or type(exc).__name__)
    log.info("settings changed: %s", ", ".join(sorted(changes)) or "nothing")
    return PrettyJSONResponse(settings.public())


def _blame(exc: Exception, changes: Dict[str, Any]) -> str:
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
    dependencies=[ControlDep], summary="start | stop | pause | resume the loop",
    responses={401: {"description": "No or wrong token"}, 403: {"description": "Cross-origin"},
               409: {"description": "Pause or resume on a stopped pipeline"}},
)
async def pipeline(action: PipelineAction, service: ServiceDep) -> PrettyJSONResponse:
    """``stop`` ends the loop and closes the source (a camera is free for others); the model
    stays loaded and ``start`` opens the source again. ``pause`` keeps the source and the model
    open and stops reading and inferring; ``resume`` continues. An action whose state is
    already reached answers 200 with ``"changed": false``; pause or resume on a stopped pipeline
    answers 409 (start it)."""

    def run() -> Tuple[LoopState, LoopState]:
        before = service.state
        return before, service.pipeline(action)

    try:
        # A stop joins the loop thread (up to 2 s): not on the event loop.
        before, state = await call_in_thread(f"pipeline-{action}", run)
    except PipelineActionError as exc:
        return PrettyJSONResponse({"detail": str(exc), "state": exc.state.value}, status_code=409)
    log.info("pipeline %s -> %s", action, state.value)
    return PrettyJSONResponse({"action": action, "state": state.value, "changed": state is not before})
