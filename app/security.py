"""The control token: who may change things, and which requests may carry the cookie.

Mutating endpoints need the token (``Authorization: Bearer`` or the page cookie) and a
same-origin request; read-only views need it only with ``--protect-views``. The cookie holds an
HMAC of the token, not the token, so no response ever carries the secret itself.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import urlsplit

from fastapi import HTTPException, Request

COOKIE_NAME = "deeplens_session"
_COOKIE_CONTEXT = b"deeplens-dashboard control cookie v1"
_TOKEN_IN_TEXT = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)


_TOKEN_TEXT = re.compile(r"[A-Za-z0-9_.~-]{16,256}")
APP_DIR = "deeplens-dashboard"


def new_token() -> str:
    return secrets.token_urlsafe(24)


class TokenFileError(Exception):
    """A token file that must not be used (others can read it, not ours, not a token)."""


def default_token_file(env: Optional[Mapping[str, str]] = None) -> Path:
    """$XDG_STATE_HOME/deeplens-dashboard/token, else ~/.local/state/... (the XDG base directory
    spec's place for state that should survive restarts; the product runs on Linux only)."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / APP_DIR / "token"


def _read_token(path: Path) -> Optional[str]:
    """The token kept in ``path``; None if there is none yet (missing or empty)."""
    try:
        fd = os.open(str(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TokenFileError(f"{path} is a symbolic link: not using it") from None
        raise TokenFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenFileError(f"{path} is not a regular file: not using it")
        if st.st_uid != os.geteuid():
            raise TokenFileError(f"{path} belongs to another user (uid {st.st_uid}): not using it")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            # Left as it is: the token in it may have been read already, so it is not ours to
            # bless by fixing the mode; the user decides.
            raise TokenFileError(
                f"{path} can be read by others (mode {mode:o}): not using it; chmod 600 {path} "
                "to keep that token, or delete the file for a new one")
        text = os.read(fd, 1024).decode("utf-8", errors="replace").strip()
    finally:
        os.close(fd)
    if not text:
        return None
    if not _TOKEN_TEXT.fullmatch(text):
        raise TokenFileError(f"{path} does not hold a token (16-256 URL-safe characters)")
    return text


def keep_token(path: Path) -> Tuple[str, bool]:
    """The token kept in ``path``, made (mode 0600, its directory 0700) if there is none yet:
    (token, made). Two processes starting at once get the same one. Raises TokenFileError."""
    found = _read_token(path)
    if found is not None:
        return found, False
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True)
        token = new_token()
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(str(temp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{token}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            if path.exists():
                os.replace(str(temp), str(path))  # an empty file: ours to fill
            else:
                os.link(str(temp), str(path))  # fails if another start made one meanwhile
        except FileExistsError:
            pass
        finally:
            if temp.exists():
                temp.unlink()
    except OSError as exc:
        raise TokenFileError(f"cannot keep the token in {path}: {exc.strerror or exc}") from None
    kept = _read_token(path)
    if kept is None:
        raise TokenFileError(f"{path} stayed empty")
    return kept, _same(kept, token)


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
