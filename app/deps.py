"""What route handlers get from the app: the service, the broadcaster, and the token checks."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request
from typing_extensions import Annotated

from app.broadcast import Broadcaster
from app.security import require_control, require_view
from inference.service import Service


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def get_broadcaster(request: Request) -> Broadcaster:
    broadcaster: Broadcaster | None = getattr(request.app.state, "broadcaster", None)
    if broadcaster is None or broadcaster.closed:
        raise HTTPException(503, "the dashboard is starting or shutting down")
    return broadcaster


ServiceDep = Annotated[Service, Depends(get_service)]
BroadcasterDep = Annotated[Broadcaster, Depends(get_broadcaster)]
ControlDep = Depends(require_control)
ViewDep = Depends(require_view)

__all__ = ["BroadcasterDep", "ControlDep", "ServiceDep", "ViewDep", "get_broadcaster", "get_service"]
