"""The event history: ``/api/events`` (newest first, filtered), one event, its snapshots and its
clip (with HTTP Range, so the browser's ``<video>`` seeks), and ``DELETE`` with the control token.

The views follow ``--protect-views`` like the stream. A clip being written (the event is still
open) is served as far as it goes: it is fragmented MP4, readable while it grows.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Optional, Tuple

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from typing_extensions import Annotated

from app.deps import ControlDep, ServiceDep, ViewDep
from app.routes import PrettyJSONResponse
from inference.events.store import EventRecord, EventStore

router = APIRouter(tags=["events"])

CHUNK = 256 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
NO_EVENTS = "no event history: recording is off (--record) and --data-dir holds none"


def _store(service: Any) -> Optional[EventStore]:
    store: Optional[EventStore] = service.event_store()
    return store


def _record(service: Any, event_id: int) -> Tuple[EventStore, EventRecord]:
    store = _store(service)
    record = store.get(event_id) if store is not None else None
    if store is None or record is None:
        raise HTTPException(404, f"no event {event_id}")
    return store, record


def with_urls(event: Dict[str, Any]) -> Dict[str, Any]:
    """An event's JSON with the URLs of its snapshot and clip (the history and the notices)."""
    base = f"/api/events/{event['id']}"
    return {**event, "snapshot_url": f"{base}/snapshot.jpg" if event.get("has_snapshot") else None,
            "clip_url": f"{base}/clip.mp4" if event.get("has_clip") else None}


def _json(record: EventRecord) -> Dict[str, Any]:
    return with_urls(record.to_json())


EventId = PathParam(..., ge=1, le=2**62, description="the event's id")


@router.get("/api/events", response_class=PrettyJSONResponse, dependencies=[ViewDep],
            summary="The event history, newest first")
async def list_events(
    service: ServiceDep,
    label: Annotated[Optional[str], Query(max_length=200, description="only this label")] = None,
    since: Annotated[Optional[datetime],
                     Query(description="started at or after (ISO 8601 or Unix seconds)")] = None,
    until: Annotated[Optional[datetime],
                     Query(description="started at or before (ISO 8601 or Unix seconds)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="at most this many")] = 50,
) -> PrettyJSONResponse:
    """``events``: each with its id, label, start/end time and duration, best probability (and
    box for a detector), model, source file, and the URLs of its snapshot and clip; ``labels``:
    every label in the history (for a filter); ``recording``: the rules, or null when off."""
    store = _store(service)
    recorder = service.recorder
    recording = recorder.stats() if recorder is not None else None
    if store is None:
        return PrettyJSONResponse({"events": [], "labels": [], "recording": recording,
                                   "detail": NO_EVENTS})
    records = store.list(label=label or None, since=since.timestamp() if since else None,
                         until=until.timestamp() if until else None, limit=limit)
    return PrettyJSONResponse({"events": [_json(r) for r in records], "labels": store.labels(),
                               "recording": recording})


@router.get("/api/events/{event_id}", response_class=PrettyJSONResponse, dependencies=[ViewDep],
            summary="One event", responses={404: {"description": "No such event"}})
async def get_event(service: ServiceDep, event_id: int = EventId) -> PrettyJSONResponse:
    _, record = _record(service, event_id)
    return PrettyJSONResponse(_json(record))


@router.get("/api/events/{event_id}/snapshot.jpg", dependencies=[ViewDep], response_class=Response,
            summary="The event's best frame (as shown; clean=1: without the overlay)",
            responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "No snapshot"}})
async def event_snapshot(
    service: ServiceDep, event_id: int = EventId,
    clean: Annotated[bool, Query(description="without the overlay")] = False,
) -> Response:
    store, _ = _record(service, event_id)
    path = store.snapshot_path(event_id, clean=clean)
    try:
        data = path.read_bytes()
    except OSError:
        raise HTTPException(404, f"event {event_id} has no snapshot") from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})


@router.get("/api/events/{event_id}/clip.mp4", dependencies=[ViewDep], response_class=Response,
            summary="The event's clip (MP4; HTTP Range for seeking)",
            responses={200: {"content": {"video/mp4": {}}}, 206: {"description": "A range"},
                       404: {"description": "No clip"}, 416: {"description": "Bad range"}})
async def event_clip(request: Request, service: ServiceDep, event_id: int = EventId) -> Response:
    store, _ = _record(service, event_id)
    for path in (store.clip_path(event_id), store.clip_part(event_id)):
        try:
            size = path.stat().st_size
            break
        except OSError:
            continue
    else:
        raise HTTPException(404, f"event {event_id} has no clip")
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "no-cache"}
    wanted = request.headers.get("range")
    start, end = 0, size - 1
    status = 200
    if wanted:
        match = _RANGE.match(wanted.strip())
        if match is None or (not match.group(1) and not match.group(2)):
            raise HTTPException(416, "Range: only one 'bytes=START-END' range is served",
                                headers={"Content-Range": f"bytes */{size}"})
        if match.group(1):
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        else:  # the last N bytes
            start = max(0, size - int(match.group(2)))
        if start >= size or start > end:
            raise HTTPException(416, f"Range: the clip has {size} bytes",
                                headers={"Content-Range": f"bytes */{size}"})
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="video/mp4")
    return StreamingResponse(_read(path, start, end - start + 1), status_code=status,
                             headers=headers, media_type="video/mp4")


async def _read(path: Path, start: int, length: int) -> AsyncIterator[bytes]:
    from starlette.concurrency import run_in_threadpool

    fd = os.open(str(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        while length > 0:
            chunk = await run_in_threadpool(os.pread, fd, min(CHUNK, length), start)
            if not chunk:
                break
            start += len(chunk)
            length -= len(chunk)
            yield chunk
    finally:
        os.close(fd)


@router.delete("/api/events/{event_id}", dependencies=[ControlDep], status_code=204,
               response_class=Response, summary="Delete an event and its files",
               responses={404: {"description": "No such event"},
                          409: {"description": "The event is still being recorded"}})
async def delete_event(service: ServiceDep, event_id: int = EventId) -> Response:
    store = _store(service)
    done = store.delete(event_id) if store is not None else None
    if done is None:
        raise HTTPException(404, f"no event {event_id}")
    if not done:
        raise HTTPException(409, f"event {event_id} is still being recorded; it can be deleted once it ends")
    return Response(status_code=204)
