"""``/stream.mjpg`` and ``/snapshot.jpg``: the annotated frames, encoded once and shared."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send
from typing_extensions import Annotated, Literal

from app.broadcast import Broadcaster, Viewer, find_transport
from app.deps import BroadcasterDep, ServiceDep, ViewDep
from app.routes import PrettyJSONResponse

log = logging.getLogger(__name__)

router = APIRouter(dependencies=[ViewDep], tags=["stream"])

BOUNDARY = "frame"
KEEPALIVE = 1.0  # resend the latest frame after this long without a new one (paused, stalled)
MAX_FPS = 120.0
NO_STORE = {
    "Cache-Control": "no-cache, no-store, must-revalidate",
    "Pragma": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each part on at once
}


class ClosingStreamingResponse(StreamingResponse):
    """Runs ``on_close`` when the response ends for any reason (finished, client gone, shutdown).

    Starlette cancels a stream whose client left while the generator may sit at a ``yield``;
    closing it here makes the clean-up deterministic instead of waiting for the GC.
    With a ``viewer``, its sends are watched: a client that takes no data is disconnected by
    the broadcaster (``STALL_SECONDS``) instead of holding its slot for ever.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None],
                 viewer: Viewer | None = None, **kwargs: object) -> None:
        super().__init__(content, **kwargs)  # type: ignore[arg-type]
        self._generator = content
        self._on_close = on_close
        self._viewer = viewer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._viewer is not None:
            self._viewer.transport = find_transport(receive, send)
            send = self._viewer.guard(send)
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self._generator, "aclose", None)
            if aclose is not None:
                await aclose()


Resolution = Annotated[
    Literal["480p", "720p", "1080p", "native"],
    Query(description="480p (858x480), 720p, 1080p or native; never upscaled past the frame"),
]


def client_name(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "?"


async def _parts(broadcaster: Broadcaster, viewer: Viewer, res: str) -> AsyncIterator[bytes]:
    hub = broadcaster.hub
    min_interval = 1.0 / viewer.fps_cap if viewer.fps_cap else 0.0
    last_seq = 0
    last_sent = 0.0
    while not broadcaster.closed and not viewer.evicted:
        if min_interval and last_sent:
            if not await broadcaster.sleep_until(last_sent + min_interval):
                break
        deadline = (last_sent or time.monotonic()) + KEEPALIVE
        newer = await broadcaster.wait_newer(last_seq, deadline)
        if broadcaster.closed:
            break
        item = hub.latest()
        if item is None or (not newer and time.monotonic() < deadline):
            continue
        # Not newer past the deadline: the same frame again keeps viewers and proxies alive.
        seq, encoding = item.seq, broadcaster.encoded(item, res)
        # A slow viewer waits in the yield below for as long as its socket is full: holding the
        # frame there would keep a few MB alive per slow viewer.
        del item
        try:
            frame = await encoding
        except Exception as exc:  # one bad frame must not end the stream; wait for the next
            log.warning("encoding frame %d at %s failed: %s", seq, res, exc)
            last_seq, last_sent = max(last_seq, seq), time.monotonic()
            continue
        broadcaster.record_sent(viewer, frame.seq)
        # The encode may be of a newer frame than asked for (the encoder skips to the newest).
        last_seq, last_sent = max(last_seq, seq, frame.seq), time.monotonic()
        yield frame.part(res)


@router.get(
    "/stream.mjpg",
    summary="Live MJPEG stream of the annotated frames",
    response_class=StreamingResponse,
    responses={
        200: {"content": {f"multipart/x-mixed-replace; boundary={BOUNDARY}": {}},
              "description": "One part per frame: image/jpeg with X-Frame-Seq and X-Timestamp"},
        503: {"description": "Too many viewers"},
    },
)
async def stream(
    request: Request, service: ServiceDep, broadcaster: BroadcasterDep,
    res: Resolution = "native",
    fps: Annotated[float, Query(ge=0, le=MAX_FPS, allow_inf_nan=False,
                                description="this viewer's frame rate at most; 0 = as it comes")] = 0,
) -> Response:
    """Parts carry ``Content-Length``, ``X-Frame-Seq`` and ``X-Timestamp`` (capture time, epoch s).
    ``?res=480p|720p|1080p|native`` (never upscaled past the annotated frame), ``?fps=`` caps
    this viewer. A slow viewer skips to the latest frame; with no new frame for ~1 s the latest
    is sent again."""
    limit = service.settings.max_viewers
    viewer = broadcaster.add_viewer(client_name(request), res, fps or None, limit)
    if viewer is None:
        return PrettyJSONResponse(
            {"detail": f"too many viewers: {limit} are already watching (the --max-viewers "
                       "limit); try again later"},
            status_code=503, headers={"Retry-After": "5"},
        )
    return ClosingStreamingResponse(
        _parts(broadcaster, viewer, res),
        on_close=lambda: broadcaster.remove_viewer(viewer),
        viewer=viewer,
        media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
        headers=NO_STORE,
    )


@router.get(
    "/snapshot.jpg",
    summary="The latest annotated frame as JPEG",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, 503: {"description": "No frame yet"}},
)
async def snapshot(service: ServiceDep, broadcaster: BroadcasterDep,
                   res: Resolution = "native") -> Response:
    item = service.hub.latest()
    if item is None:
        return PrettyJSONResponse({"detail": "no frame yet"}, status_code=503)
    frame = await broadcaster.encoded(item, res)
    headers = {**NO_STORE, "X-Frame-Seq": str(frame.seq), "X-Timestamp": f"{frame.timestamp:.6f}"}
    return Response(frame.jpeg(res), media_type="image/jpeg", headers=headers)
