"""``/results`` (the latest result as JSON) and ``/results/events`` (one SSE event per result)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from app.broadcast import Broadcaster, Viewer
from app.deps import BroadcasterDep, ServiceDep, ViewDep
from app.routes import PrettyJSONResponse, _finite
from app.routes.control import control_events
from app.routes.events import with_urls
from app.routes.stream import NO_STORE, ClosingStreamingResponse, client_name
from inference.pipeline.frames import Frame
from inference.service import Service

router = APIRouter(dependencies=[ViewDep], tags=["results"])

SSE_KEEPALIVE = 15.0  # a comment line this often keeps proxies from closing an idle stream
SSE_RETRY_MS = 2000


def result_json(service: Service, item: Frame | None, state: str | None = None) -> dict[str, Any]:
    """``state``: the pipeline state to show, if the caller has read it already."""
    state = service.state.value if state is None else state
    if item is None:
        return {"seq": 0, "timestamp": None, "model": None, "results": [], "payload": {},
                "fps": 0.0, "timings_ms": {}, "error": "no frame yet", "state": state}
    # to_json already carries the seed's {label: prob} as "payload".
    return {**item.result.to_json(), "state": state}


@router.get("/results", response_class=PrettyJSONResponse, summary="The latest result")
async def results(service: ServiceDep) -> PrettyJSONResponse:
    """``seq`` (the frame's), capture ``timestamp``, ``model``, ``results`` (label, name, prob;
    boxes for ssd), ``payload`` (the seed's IoT ``{label: prob}``), ``fps``, ``timings_ms``,
    and the pipeline ``state``."""
    return PrettyJSONResponse(result_json(service, service.hub.latest()), headers=NO_STORE)


def _event(data: dict[str, Any], seq: int) -> bytes:
    try:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(data), separators=(",", ":"))
    return f"id: {seq}\nevent: result\ndata: {text}\n\n".encode()


def _with_urls(event: dict[str, Any] | None) -> dict[str, Any] | None:
    # As GET /api/events shows an event, so the page renders a notice like a history row.
    return with_urls(event) if event is not None else None


def encode_notice(payload: dict[str, Any]) -> bytes:
    """An event notice (``{"type": "new"|"update"|"end", "before", "after"}``) as the SSE event
    ``event``."""
    data = {**payload, "before": _with_urls(payload.get("before")),
            "after": _with_urls(payload.get("after"))}
    try:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(data), separators=(",", ":"))
    return f"event: event\ndata: {text}\n\n".encode()


# Told to a subscriber that fell behind by more than the notices kept: the page reloads the history.
GAP_NOTICE = b'event: event\ndata: {"type":"gap","before":null,"after":null}\n\n'


async def _events(broadcaster: Broadcaster, service: Service, viewer: Viewer) -> AsyncIterator[bytes]:
    yield f"retry: {SSE_RETRY_MS}\n\n".encode()
    broadcaster.follow(service, encode_notice)
    # Only the notices from now on: the page loads the history with GET /api/events once the
    # first state event (below) tells it this stream is following.
    notices = broadcaster.notices
    changes = -1  # the settings and state go first, then again after each change
    last_seq = 0
    last_sent = time.monotonic()
    while not broadcaster.closed and not viewer.evicted:
        if changes != broadcaster.changes:
            changes, last_sent = broadcaster.changes, time.monotonic()
            yield control_events(service)
            continue
        if notices != broadcaster.notices:
            notices, notice = broadcaster.notice_after(notices)
            last_sent = time.monotonic()
            yield GAP_NOTICE if notice is None else notice
            continue
        newer = await broadcaster.wait_newer(last_seq, last_sent + SSE_KEEPALIVE, changes, notices)
        if broadcaster.closed:
            break
        if changes != broadcaster.changes or notices != broadcaster.notices:
            continue
        item = service.hub.latest()
        if not newer or item is None:
            last_sent = time.monotonic()
            yield b": keepalive\n\n"
            continue
        last_seq, last_sent = item.seq, time.monotonic()
        broadcaster.record_sent(viewer, item.seq)
        event = _shared_event(broadcaster, service, item)
        del item  # a slow subscriber waits in the yield: it must not keep the frame alive
        yield event


def _shared_event(broadcaster: Broadcaster, service: Service, item: Frame) -> bytes:
    """The result event of ``item``, JSON-encoded once and shared by every subscriber: the
    encode is most of an event's cost, and each subscriber's would be the same bytes. The
    state is part of the key because the event shows it."""
    state = service.state.value
    return broadcaster.shared_event(
        (item.seq, item.timestamp, state),
        lambda: _event(result_json(service, item, state), item.seq))


@router.get(
    "/results/events",
    summary="Server-Sent Events: one 'result' event per new result, 'event' notices",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, 503: {"description": "Too many subscribers"}},
)
async def result_events(request: Request, service: ServiceDep,
                        broadcaster: BroadcasterDep) -> Response:
    """Each event is ``event: result`` with ``id`` = seq and the ``/results`` JSON as data; the
    latest result comes at once on connect. A slow subscriber skips to the latest. ``config``
    (as ``GET /api/config``) and ``state`` (``{"state", "actions"}``) events come first and
    again after each change of the live settings or the pipeline's state. With recording on,
    each event's start, update and end comes as ``event: event`` with ``{"type": "new"|"update"
    |"end", "before", "after"}`` (an event as ``GET /api/events`` shows it), from the time of
    connecting on; ``"type": "gap"`` says some were missed (reload the history)."""
    limit = service.settings.max_viewers
    viewer = broadcaster.add_viewer(client_name(request), "-", None, limit, kind="sse")
    if viewer is None:
        return PrettyJSONResponse(
            {"detail": f"too many event subscribers: {limit} are already connected; try again later"},
            status_code=503, headers={"Retry-After": "5"},
        )
    return ClosingStreamingResponse(
        _events(broadcaster, service, viewer),
        on_close=lambda: broadcaster.remove_viewer(viewer),
        viewer=viewer,
        media_type="text/event-stream",
        headers=NO_STORE,
    )
