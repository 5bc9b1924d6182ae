"""The control token: who may change things, and which requests may carry the cookie.

Mutating endpoints need the token (``Authorization: Bearer`` or the page cookie) and a
same-origin request; read-only views need it only with ``--protect-views``. The cookie holds an
HMAC of the token, not the token, so no response ever carries the secret itself.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from urllib.parse import urlsplit

from fastapi import HTTPException, Request

COOKIE_NAME = "deeplens_session"
_COOKIE_CONTEXT = b"deeplens-dashboard control cookie v1"
_TOKEN_IN_TEXT = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def cookie_value(token: str) -> str:
    return hmac.new(token.encode(), _COOKIE_CONTEXT, hashlib.sha256).hexdigest()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def token_of(request: Request) -> str:
    return str(request.app.state.token)


def bearer_ok(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and bool(value) and _same(value.strip(), token)


def cookie_ok(request: Request, token: str) -> bool:
    value = request.cookies.get(COOKIE_NAME, "")
    return bool(value) and _same(value, cookie_value(token))


def query_ok(request: Request, token: str) -> bool:
    value = request.query_params.get("token", "")
    return bool(value) and _same(value, token)


def authorized(request: Request, allow_query: bool = False) -> bool:
    token = token_of(request)
    if not token:
        return False
    return bearer_ok(request, token) or cookie_ok(request, token) or (
        allow_query and query_ok(request, token)
    )


def same_origin(request: Request) -> bool:
    """False for a request a browser marks as coming from another site or origin."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True  # curl, scripts: no browser ambient authority to abuse
    host = request.headers.get("host", "")
    parsed = urlsplit(origin)
    return bool(parsed.netloc) and parsed.netloc.lower() == host.lower()


async def require_control(request: Request) -> None:
    """Dependency of every mutating endpoint: same origin (else 403), the token (else 401).

    ``async`` although it never awaits: FastAPI runs sync dependencies in its threadpool."""
    if not same_origin(request):
        raise HTTPException(403, "cross-origin requests may not change the dashboard")
    if not authorized(request):
        raise HTTPException(
            401,
            "the control token is missing or wrong: send 'Authorization: Bearer TOKEN' or open "
            "the control URL printed at start (…/?token=TOKEN) once in this browser",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def require_view(request: Request) -> None:
    """Dependency of the read-only views: open unless --protect-views (then ?token= works too,
    for <img> tags, ffmpeg and curl)."""
    if not request.app.state.service.settings.protect_views:
        return
    if not authorized(request, allow_query=True):
        raise HTTPException(
            401, "this dashboard is protected (--protect-views): give the token",
            headers={"WWW-Authenticate": "Bearer"},
        )


class RedactTokens(logging.Filter):
    """Masks ``token=...`` in log records (uvicorn's access log prints query strings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_IN_TEXT.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args
            )
        if isinstance(record.msg, str) and "token=" in record.msg.lower():
            record.msg = _TOKEN_IN_TEXT.sub(r"\1***", record.msg)
        return True
