"""The control token: who may change things, and which requests may carry the cookie.

Mutating endpoints need the token (``Authorization: Bearer`` or the page cookie) and a
same-origin request; read-only views need it only with ``--protect-views``. The cookie holds the
time it was issued and an HMAC of that time keyed by the token, not the token: no response ever
carries the secret itself, the cookie expires on the server after ``COOKIE_MAX_AGE``, survives a
restart with the same token and dies with a token change. Wrong tokens are throttled per client
address (:class:`LoginThrottle`).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import secrets
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import unquote_plus, urlsplit

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE_NAME = "deeplens_session"
_COOKIE_CONTEXT = b"deeplens-dashboard control cookie v2|"
# A month: the page is opened now and then on a device one owns, so a monthly visit to the control
# URL costs little, while a cookie left in a browser (a shared or lost laptop) stops working.
COOKIE_MAX_AGE = 30 * 24 * 3600
# A cookie issued "later" than now is accepted within this much, for a clock set back a little.
_COOKIE_CLOCK_SKEW = 24 * 3600
MIN_TOKEN_LENGTH = 16
# One query parameter (its key still percent-encoded) in a URL inside log text.
_QUERY_PARAM = re.compile(r"(?P<lead>^|[?&;\s])(?P<param>[^?&;=\s\"']*(?:=[^&;\s\"']*)?)")


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


def cookie_value(token: str, issued: Optional[float] = None) -> str:
    """``ISSUED.MAC``: the Unix time it was issued and an HMAC of that time keyed by the token."""
    when = str(int(time.time() if issued is None else issued))
    return f"{when}.{_cookie_mac(token, when)}"


def _cookie_mac(token: str, issued: str) -> str:
    return hmac.new(token.encode(), _COOKIE_CONTEXT + issued.encode(), hashlib.sha256).hexdigest()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def token_of(request: Request) -> str:
    return str(request.app.state.token)


def bearer_ok(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and bool(value) and _same(value.strip(), token)


def cookie_ok(request: Request, token: str) -> bool:
    issued, _, mac = request.cookies.get(COOKIE_NAME, "").partition(".")
    if not (issued.isdigit() and len(issued) <= 12 and mac):
        return False
    if not _same(mac, _cookie_mac(token, issued)):
        return False
    age = time.time() - int(issued)
    return -_COOKIE_CLOCK_SKEW <= age <= COOKIE_MAX_AGE


def query_ok(request: Request, token: str) -> bool:
    value = request.query_params.get("token", "")
    return bool(value) and _same(value, token)


def _presented(request: Request, allow_query: bool) -> bool:
    """Whether the request offers a credential that could be the token (a guess if wrong)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return bool(
        (scheme.lower() == "bearer" and value.strip()) or request.cookies.get(COOKIE_NAME)
        or (allow_query and request.query_params.get("token"))
    )


def authorized(request: Request, allow_query: bool = False) -> bool:
    """Whether the request carries the token. A wrong one counts against its client address;
    from an address with too many, any credential is answered 429 before it is looked at (else
    the right guess would still show as a 200)."""
    token = token_of(request)
    if not token or not _presented(request, allow_query):
        return False
    # One request may be asked twice (the page, then its controls): one guess, counted once.
    decided: Dict[bool, bool] = request.scope.setdefault("deeplens.authorized", {})
    if allow_query in decided:
        return decided[allow_query]
    throttle: Optional[LoginThrottle] = getattr(request.app.state, "throttle", None)
    address = request.client.host if request.client else ""
    if throttle is not None:
        wait = throttle.blocked(address)
        if wait > 0:
            raise HTTPException(
                429, f"too many wrong tokens from {address}: try again in {math.ceil(wait)} s",
                headers={"Retry-After": str(math.ceil(wait))})
    ok = bearer_ok(request, token) or cookie_ok(request, token) or (
        allow_query and query_ok(request, token)
    )
    if not ok and throttle is not None:
        throttle.failed(address)
    decided[allow_query] = ok
    return ok


def stale_cookie(request: Request) -> bool:
    """A cookie that no longer opens the controls (expired, or made with an older token): the
    answer removes it, so a browser does not keep offering it as a wrong guess."""
    return bool(request.cookies.get(COOKIE_NAME)) and not cookie_ok(request, token_of(request))


CLEAR_COOKIE = f"{COOKIE_NAME}=; Max-Age=0; Path=/; HttpOnly; SameSite=strict"


class LoginThrottle:
    """Wrong-token failures per client address, in bounded memory.

    The first ``free_failures`` cost nothing (typos); from then on each failure blocks its address
    for twice as long as the one before (1 s, 2 s, 4 s ... up to ``MAX_DELAY``), during which every
    request there offering a credential gets 429. Only that address waits: the right token from
    anywhere else is never slowed; on a shared address (NAT, a proxy) the owner waits too, which
    cannot be helped without telling a right guess apart from a wrong one. An address quiet for
    ``FORGET_AFTER`` starts afresh. IPv6 clients count by /64, the block one host is usually given.
    At most ``max_addresses`` are tracked; past that the one whose last failure is oldest is
    dropped."""

    FREE_FAILURES = 5
    FIRST_DELAY = 1.0
    MAX_DELAY = 60.0
    FORGET_AFTER = 15 * 60.0
    MAX_ADDRESSES = 4096

    def __init__(self, free_failures: int = FREE_FAILURES, max_addresses: int = MAX_ADDRESSES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free_failures = free_failures
        self.max_addresses = max_addresses
        self._clock = clock
        self._lock = threading.Lock()
        # address -> [failures, time of the last one, blocked until]; oldest failure first
        self._seen: OrderedDict[str, List[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    @staticmethod
    def _key(address: str) -> str:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
        return str(ip)

    def blocked(self, address: str) -> float:
        """Seconds ``address`` must still wait (0: not blocked)."""
        now = self._clock()
        with self._lock:
            entry = self._seen.get(self._key(address))
            return max(0.0, entry[2] - now) if entry is not None else 0.0

    def failed(self, address: str) -> None:
        now = self._clock()
        key = self._key(address)
        with self._lock:
            entry = self._seen.pop(key, None)
            if entry is None or now - entry[1] > self.FORGET_AFTER:
                entry = [0.0, now, 0.0]
            entry[0] += 1
            entry[1] = now
            beyond = int(entry[0]) - self.free_failures
            if beyond >= 0:
                entry[2] = now + min(self.MAX_DELAY, self.FIRST_DELAY * 2.0 ** min(beyond, 30))
            self._seen[key] = entry
            while len(self._seen) > self.max_addresses:
                self._seen.popitem(last=False)


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
            headers=_refusal_headers(request),
        )


def _refusal_headers(request: Request) -> Dict[str, str]:
    headers = {"WWW-Authenticate": "Bearer"}
    if stale_cookie(request):
        headers["Set-Cookie"] = CLEAR_COOKIE
    return headers


async def require_view(request: Request) -> None:
    """Dependency of the read-only views: open unless --protect-views (then ?token= works too,
    for <img> tags, ffmpeg and curl)."""
    if not request.app.state.service.settings.protect_views:
        return
    if not authorized(request, allow_query=True):
        raise HTTPException(
            401, "this dashboard is protected (--protect-views): give the token",
            headers=_refusal_headers(request),
        )


def redact_query(text: str) -> str:
    """``text`` with the value of every query parameter named ``token`` masked, the name compared
    as the server reads it (percent-decoded: ``%74oken=`` is ``token=`` to Starlette), in any case,
    with ``;`` taken as a separator too (Python 3.7's parse_qsl does)."""

    def mask(match: re.Match[str]) -> str:
        param = match.group("param")
        if not unquote_plus(param).lstrip().lower().startswith("token="):
            return match.group(0)
        key = param.partition("=")[0]
        if unquote_plus(key).strip().lower() == "token":
            return f"{match.group('lead')}{key}=***"
        return f"{match.group('lead')}***"  # its "=" was encoded too: nothing of it is kept

    return _QUERY_PARAM.sub(mask, text)


class RedactTokens(logging.Filter):
    """Masks the token of ``?token=...`` in log records (uvicorn's access log prints query
    strings as they came, still percent-encoded)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact_query(record.msg)
        return True


# What the pages need and no more: scripts, styles, the stream and fetch/SSE from the dashboard
# itself; images also as data: URIs (the page's blank favicon, Swagger UI's icons). Nothing may
# frame a page (clickjacking the controls), and no page may be told to post elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


class SecurityHeaders:
    """Framing, content-security, sniffing and referrer headers on every answer, errors included.

    ``inline_script_paths``: pages whose own inline scripts are allowed by their hash (Swagger
    UI's /docs starts itself with one); the page is read whole, which only a small, finite HTML
    answer may be."""

    def __init__(self, app: ASGIApp, inline_script_paths: Tuple[str, ...] = ()) -> None:
        self.app = app
        self.inline_script_paths = frozenset(inline_script_paths)

    @staticmethod
    def _headers(policy: str) -> List[Tuple[bytes, bytes]]:
        return [
            (b"content-security-policy", policy.encode()),
            (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"),
            # The control URL carries the token in its query: no page passes its address on.
            (b"referrer-policy", b"no-referrer"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] not in self.inline_script_paths:
            extra = self._headers(CONTENT_SECURITY_POLICY)

            async def with_headers(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
                await send(message)

            await self.app(scope, receive, with_headers)
            return

        start: Dict[str, Message] = {}
        body: List[bytes] = []

        async def buffered(message: Message) -> None:
            if message["type"] == "http.response.start":
                start["message"] = message
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            content = b"".join(body)
            hashes = " ".join(
                f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
                for script in _INLINE_SCRIPT.findall(content))
            policy = CONTENT_SECURITY_POLICY + (f"; script-src 'self' {hashes}" if hashes else "")
            first = start["message"]
            await send({**first, "headers": [*first.get("headers", []), *self._headers(policy)]})
            await send({"type": "http.response.body", "body": content, "more_body": False})

        await self.app(scope, receive, buffered)
