"""Security: every mutating endpoint locked (enumerated from the app, so a new one cannot be
forgotten), constant-time token checks, the token in no response and no log line but the one at
start, CSRF refusal, static files without traversal or listing, body and subscriber limits,
--protect-views over every view of the schema, and TLS with a pair made here.

Already covered elsewhere (not repeated): the cookie's HttpOnly / SameSite=Strict / no raw token
(test_control.test_cookie_flow_without_leaking_the_token), the access-log redaction
(test_control.test_access_log_lines_never_show_the_token), the MJPEG viewer cap
(test_stream.test_viewer_cap_answers_503_and_frees_the_slot), a 413 with Content-Length
(test_control.test_malformed_and_oversized_bodies), HTTPS and the Secure cookie
(test_server.test_tls_serves_https_and_marks_the_cookie_secure).
"""

from __future__ import annotations

import ast
import hmac
import inspect
import io
import logging
import re
import socket
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

import app.security
from app.cli import main as cli_main
from app.main import create_app
from app.security import COOKIE_NAME, cookie_value, require_control
from app.server import run_in_thread
from inference.service import Service
from inference.settings import Settings
from tests.conftest import free_port, require_tool
from tests.test_server import TOKEN, PartReader, Running, fake_model_factory, running_server

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
PATH_VALUES = {"action": "pause", "event_id": "1"}


def _walk(routes: list[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        # FastAPI >= 0.16x keeps included routers as routes of their own; older ones flatten them.
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _walk(inner.routes)


def _app_routes() -> list[APIRoute]:
    service = Service(Settings(source="synthetic", token=TOKEN))
    routes = list(_walk(create_app(service).routes))
    assert len(routes) >= 10, "the route walk found too few routes: FastAPI changed its layout?"
    return routes


def _mutations() -> list[tuple[str, str]]:
    found = []
    for route in _app_routes():
        for method in sorted(route.methods & MUTATING):
            path = route.path
            for name, value in PATH_VALUES.items():
                path = path.replace("{" + name + "}", value)
            assert "{" not in path, f"give PATH_VALUES a value for {route.path}"
            found.append((method, path))
    return found


MUTATIONS = _mutations()


def test_the_mutation_list_is_complete_and_each_depends_on_require_control() -> None:
    assert ("PATCH", "/api/config") in MUTATIONS and ("POST", "/api/pipeline/pause") in MUTATIONS
    for route in _app_routes():
        if route.methods & MUTATING:
            calls = {d.call for d in route.dependant.dependencies}
            assert require_control in calls, f"{route.path} is not guarded by require_control"


@pytest.fixture(scope="module")
def srv() -> Iterator[Running]:
    with running_server() as running:
        running.wait_frames(1)
        yield running


@pytest.fixture(autouse=True)
def _unthrottled(request: pytest.FixtureRequest) -> None:
    """These tests send many wrong tokens from one address on purpose, to see each refused with
    401: a fresh throttle before each attempt lets every one reach the token check (the throttle
    itself: test_auth_hardening)."""
    if "srv" in request.fixturenames:
        _fresh_throttle(request.getfixturevalue("srv"))


def _fresh_throttle(srv: Running) -> None:
    srv.thread.server.app.state.throttle = app.security.LoginThrottle()


def _unchanged(srv: Running) -> None:
    assert srv.service.loop.state.value == "running"
    assert srv.service.settings.threshold == 0.0 and srv.service.settings.top_k == 5


@pytest.mark.parametrize(("method", "path"), MUTATIONS, ids=[f"{m} {p}" for m, p in MUTATIONS])
def test_every_mutation_refuses_no_token_and_a_wrong_one(srv: Running, method: str, path: str) -> None:
    body = {"threshold": 0.9, "top_k": 1}
    wrong_same_length = "x" * len(TOKEN)
    attempts: list[dict[str, Any]] = [
        {},
        {"headers": {"Authorization": "Bearer wrong"}},
        {"headers": {"Authorization": f"Bearer {wrong_same_length}"}},
        {"headers": {"Authorization": f"Bearer {TOKEN[:-1]}"}},  # a prefix is not the token
        {"headers": {"Authorization": f"Basic {TOKEN}"}},
        {"headers": {"Authorization": "Bearer"}},
        {"params": {"token": TOKEN}},  # ?token= is for views, never for changes
        {"cookies": {COOKIE_NAME: TOKEN}},  # the raw token is not the cookie
        {"cookies": {COOKIE_NAME: cookie_value("guess")}},
    ]
    for attempt in attempts:
        _fresh_throttle(srv)
        cookies = attempt.pop("cookies", None)
        with srv.client(cookies=cookies) as client:
            response = client.request(method, path, json=body, **attempt)
        assert response.status_code == 401, (attempt, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert "token" in response.json()["detail"]
    _unchanged(srv)


@pytest.mark.parametrize(("method", "path"), MUTATIONS, ids=[f"{m} {p}" for m, p in MUTATIONS])
def test_every_mutation_refuses_another_origin_even_with_the_token(
    srv: Running, method: str, path: str
) -> None:
    """CSRF: a page on another site can make the browser send the cookie; the browser also says
    where the request comes from, and that is refused before the token is even looked at."""
    body = {"threshold": 0.9, "top_k": 1}
    cookie = {COOKIE_NAME: cookie_value(TOKEN)}
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},  # sandboxed iframes, file:// pages
        {"Origin": srv.url.replace("127.0.0.1", "localhost")},
        {"Origin": srv.url + "0"},  # another port
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # a sibling subdomain is another origin
        {"Sec-Fetch-Site": "cross-site", "Origin": srv.url},
    ):
        for creds in ({"headers": {"Authorization": f"Bearer {TOKEN}"}}, {"cookies": cookie}):
            with srv.client(cookies=creds.get("cookies")) as client:
                response = client.request(method, path, json=body,
                                          headers={**headers, **creds.get("headers", {})})
            assert response.status_code == 403, (headers, response.text)
            assert "cross-origin" in response.json()["detail"]
    _unchanged(srv)


def test_token_checks_use_compare_digest(srv: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with srv.client("guess-0123456789abcdefg") as client:
        assert client.post("/api/pipeline/resume").status_code == 401
    assert (b"guess-0123456789abcdefg", TOKEN.encode()) in compared
    compared.clear()
    issued = "1700000000"
    with srv.client(cookies={COOKIE_NAME: f"{issued}.{'f' * 64}"}) as client:
        assert client.post("/api/pipeline/resume").status_code == 401
    assert (b"f" * 64, cookie_value(TOKEN, issued=int(issued)).split(".")[1].encode()) in compared
    # And no token or cookie comparison with == anywhere in the module.
    tree = ast.parse(inspect.getsource(app.security))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            assert not names & {"token", "value", "a", "b"}, ast.dump(node)


def test_the_token_is_in_no_response_and_logged_only_at_start(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole session, at log level debug (access log on), with the token given the ways it can
    be (query, bearer, cookie) and guessed wrong; then every header, body and log line is read."""
    caplog.set_level(logging.DEBUG)
    # uvicorn turns propagation off for good once a server ran without an access log (the other
    # tests' servers): let this one's access lines reach caplog.
    monkeypatch.setattr(logging.getLogger("uvicorn.access"), "propagate", True)
    settings = Settings(source="synthetic:320x180@30", host="127.0.0.1", port=free_port(), token="",
                        fifo="off", iot="off", log_level="debug", protect_views=True)
    service = Service(settings, model_factory=fake_model_factory)
    service.start()  # the app's lifespan does not: its owner (here this test) does
    try:
        thread = run_in_thread(service)  # generates the token and logs it once
    except BaseException:
        service.stop()
        raise
    token = thread.server.app.state.token
    assert len(token) >= 24
    seen: list[str] = []

    def record(response: httpx.Response) -> None:
        seen.append(f"{response.status_code} {response.headers!r}")
        if not response.headers.get("content-type", "").startswith(
                ("multipart/x-mixed-replace", "text/event-stream")):
            response.read()
            seen.append(response.content.decode("latin-1"))

    try:
        with httpx.Client(base_url=thread.url, timeout=10, event_hooks={"response": [record]}) as c:
            c.get("/")
            c.get("/", params={"token": "wrong"})
            c.get("/", params={"token": token})  # -> cookie
            c.get("/", follow_redirects=True)
            for path in ("/results", "/snapshot.jpg", "/api/config", "/api/stats", "/health",
                         "/metrics", "/api/iot/messages", "/openapi.json", "/docs",
                         "/static/app.js", "/nope"):
                c.get(path)
                c.get(path, params={"token": token, "res": "480p"})
            c.patch("/api/config", json={"token": "new"})
            c.patch("/api/config", json={"threshold": 0.1})
            c.post("/api/pipeline/pause", headers={"Origin": "http://evil.example"})
            c.post("/api/pipeline/resume")
        with httpx.Client(base_url=thread.url, timeout=10, event_hooks={"response": [record]}) as c:
            c.post("/api/pipeline/resume", headers={"Authorization": "Bearer nope"})
            # Refused before validation, so the value is never echoed in a 422 to a stranger.
            c.patch("/api/config", json={"top_k": token})
            c.post("/api/pipeline/resume", headers={"Authorization": f"Bearer {token}"})
            for path in ("/stream.mjpg", "/results/events"):
                with c.stream("GET", path, params={"token": token}) as response:
                    chunk = next(response.iter_bytes())
                    seen.append(chunk.decode("latin-1"))
    finally:
        thread.stop()
        service.stop()
    assert len(seen) > 40
    for text in seen:
        assert token not in text, text[:300]
        assert TOKEN not in text
    server_side = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]  # not ours
    lines = [r.getMessage() for r in server_side] + [r.exc_text or "" for r in server_side]
    with_token = [line for line in lines if token in line]
    assert len(with_token) == 1 and "control (opens with the control token)" in with_token[0], with_token
    assert any("GET /results?token=***" in line for line in lines), "the access log was on"


# -- static files ----------------------------------------------------------------------------------
def _raw_get(url: str, path: str) -> tuple[int, bytes]:
    """A request with the path exactly as given: clients would normalise the dots away."""
    host, port = url.split("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        chunk = sock.recv(65536)
        while chunk:
            data += chunk
            chunk = sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


TRAVERSALS = [
    "/static/../security.py", "/static/../app/security.py", "/static/../../pyproject.toml",
    "/static/%2e%2e/security.py", "/static/%2E%2E/%2E%2E/pyproject.toml", "/static/..%2fsecurity.py",
    "/static/%2e%2e%2f%2e%2e%2finference/settings.py", "/static/..%5csecurity.py",
    "/static/..\\security.py", "/static/./../main.py", "/static/....//security.py",
    "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/static/app.css%00/../../security.py",
    "/../app/security.py", "/static/../templates/index.html",
]


def test_static_files_allow_no_traversal_and_no_listing(srv: Running) -> None:
    status, css = _raw_get(srv.url, "/static/app.css")
    assert status == 200 and css  # the mount works, so the refusals below mean something
    secrets_ = (b"compare_digest", b"[build-system]", b"SECRET_FIELDS", b"root:", b"create_app",
                b"{% ", b"<html")
    for path in TRAVERSALS:
        status, body = _raw_get(srv.url, path)
        assert status in (400, 404), (path, status)
        assert not any(s in body for s in secrets_), (path, body[:200])
    for path in ("/static/", "/static/.", "/static/%2e", "/static/templates"):
        status, body = _raw_get(srv.url, path)
        assert status in (404, 405), (path, status)
        assert b"app.css" not in body and b"app.js" not in body, path
    status, _ = _raw_get(srv.url, "/static")
    assert status in (307, 404)  # a redirect to /static/, which lists nothing


# -- limits ----------------------------------------------------------------------------------------
def test_patch_body_limit_holds_without_content_length(srv: Running) -> None:
    """A chunked body (no Content-Length) is cut off at the limit while it streams in."""
    def chunks() -> Iterator[bytes]:
        yield b'{"source": "'
        for _ in range(64):
            yield b"x" * 1024
        yield b'"}'

    with srv.client(TOKEN) as client:
        response = client.patch("/api/config", content=chunks())
        assert response.status_code == 413 and "larger than" in response.json()["detail"]
        assert client.patch("/api/config", json={"top_k": 5}).status_code == 200
    # A declared length over the limit is refused before any of the body is read.
    host, port = srv.url.split("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"PATCH /api/config HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 99999999\r\n\r\n{}".encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    _unchanged(srv)


def test_sse_subscriber_cap_answers_503_and_frees_the_slot() -> None:
    with running_server(max_viewers=2) as srv, srv.client() as a, srv.client() as b, \
            srv.client() as c:
        with a.stream("GET", "/results/events") as ra, b.stream("GET", "/results/events") as rb:
            open_streams = [ra.iter_bytes(), rb.iter_bytes()]
            for stream in open_streams:
                next(stream)
            refused = c.get("/results/events")
            assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
            assert "too many event subscribers: 2" in refused.json()["detail"]
            # The MJPEG viewers have their own count: the stream still opens.
            with c.stream("GET", "/stream.mjpg") as stream:
                assert stream.status_code == 200
        for _ in range(200):
            if c.get("/api/stats").json()["event_subscribers"] == 0:
                break
            srv.wait_frames(1)
        with c.stream("GET", "/results/events") as again:
            assert again.status_code == 200


# -- --protect-views over every view of the schema ---------------------------------------------------
OPEN_VIEWS = {"/health", "/metrics"}  # liveness probes and Prometheus scrapes stay open


def test_protect_views_covers_every_view_in_the_schema() -> None:
    with running_server(protect_views=True) as srv, srv.client() as anonymous:
        srv.wait_frames(1)
        paths = anonymous.get("/openapi.json").json()["paths"]
        views = sorted(p for p, ops in paths.items() if "get" in ops and "{" not in p)
        assert {"/stream.mjpg", "/snapshot.jpg", "/results", "/results/events"} <= set(views)
        for path in views:
            if path in OPEN_VIEWS:
                assert anonymous.get(path).status_code == 200, path
                continue
            _fresh_throttle(srv)  # a wrong token per view, on purpose
            for params in ({}, {"token": "wrong"}):
                with anonymous.stream("GET", path, params=params) as refused:
                    assert refused.status_code == 401, path
            with anonymous.stream("GET", path, params={"token": TOKEN}) as response:
                assert response.status_code == 200, path
                if path == "/stream.mjpg":
                    PartReader(response.iter_bytes()).next()
                elif path == "/results/events":
                    assert any(line.startswith("data:") for line in _lines(response))
        assert anonymous.get("/").status_code == 401


def _lines(response: httpx.Response) -> Iterator[str]:
    for count, line in enumerate(response.iter_lines()):
        yield line
        if line.startswith("data:") or count > 50:
            return


# -- TLS ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    openssl = require_tool("openssl")
    folder = tmp_path_factory.mktemp("tls")
    pair = {"cert": folder / "cert.pem", "key": folder / "key.pem", "other_key": folder / "other.pem"}
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pair["key"]),
         "-out", str(pair["cert"]), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    subprocess.run([openssl, "genrsa", "-out", str(pair["other_key"]), "2048"],
                   check=True, capture_output=True, timeout=60)
    return pair


def test_tls_verifies_against_the_given_certificate(tls_pair: dict[str, Path]) -> None:
    with running_server(ssl_certfile=str(tls_pair["cert"]), ssl_keyfile=str(tls_pair["key"])) as srv:
        trusting = ssl.create_default_context(cafile=str(tls_pair["cert"]))
        with httpx.Client(base_url=srv.url, verify=trusting, timeout=10,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            assert client.get("/health").status_code == 200
            assert client.post("/api/pipeline/resume").status_code == 200
        with httpx.Client(base_url=srv.url, timeout=10) as untrusting, pytest.raises(httpx.ConnectError):
            untrusting.get("/health")  # the system store does not know our pair: verification is real


def _cli_exit(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as exited:
        cli_main(["serve", "--host", "127.0.0.1", "--port", str(free_port()), "--source", "synthetic",
                  "--fifo", "off", "--iot", "off", *args])
    return int(exited.value.code or 0), err.getvalue()


def test_tls_options_that_cannot_work_exit_2_naming_the_option(tls_pair: dict[str, Path],
                                                                tmp_path: Path) -> None:
    cases = [
        (["--ssl-certfile", str(tls_pair["cert"]), "--ssl-keyfile", str(tls_pair["other_key"])],
         "--ssl-certfile"),
        (["--ssl-certfile", str(tmp_path / "missing.pem")], "--ssl-certfile"),
        (["--ssl-keyfile", str(tls_pair["key"])], "--ssl-keyfile"),
        (["--ssl-certfile", str(tls_pair["key"]), "--ssl-keyfile", str(tls_pair["key"])],
         "--ssl-certfile"),
    ]
    for args, option in cases:
        code, err = _cli_exit(*args)
        assert code == 2, (args, err)
        assert re.search(rf"error: {option}\b", err), (args, err)
        assert "Traceback" not in err


# -- the generated token survives restarts ------------------------------------------------------------
def _start_and_read_token(port: int, env: dict[str, str], *args: str) -> tuple[str, str]:
    """Start the CLI, wait for its start-up lines, stop it with SIGTERM: (the URL's token, the log)."""
    import os
    import signal
    import sys
    import threading

    from tests.conftest import ROOT

    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port), "--source",
         "synthetic:160x120@10", "--model", "catdog", "--fifo", "off", "--iot", "off", *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: list[str] = []
    seen = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "control (" in line or "control: open" in line:  # served, signals handled
                seen.set()

    reader = threading.Thread(target=drain, name="cli-stderr", daemon=True)
    reader.start()
    try:
        assert seen.wait(90), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
    log = "".join(lines)
    found = re.search(r"\?token=(\S+)", log)
    return (found.group(1) if found else ""), log


def test_a_generated_token_is_kept_owner_only_and_reused_at_the_next_start(tmp_path: Path) -> None:
    import stat

    state = tmp_path / "state"
    env = {"XDG_STATE_HOME": str(state)}
    first, log1 = _start_and_read_token(free_port(), env)
    second, log2 = _start_and_read_token(free_port(), env)
    kept = state / "deeplens-dashboard" / "token"
    assert first and first == second, "the bookmarked control URL still works after a restart"
    assert kept.read_text().strip() == first
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    for log in (log1, log2):
        assert str(kept) in log, "the path is logged"
        assert log.count(first) == 1, "the token only in the control URL line"
    # --token-file chooses the file; off: a new token each start; a given --token is never written.
    mine = tmp_path / "conf" / "dashboard.token"
    third, _ = _start_and_read_token(free_port(), env, "--token-file", str(mine))
    assert third != first and mine.read_text().strip() == third
    off, _ = _start_and_read_token(free_port(), env, "--token-file", "off")
    assert off not in (first, third)
    given = tmp_path / "given.token"
    _, log = _start_and_read_token(free_port(), env, "--token", "my-own-token-0123456789",
                                   "--token-file", str(given))
    assert not given.exists() and "my-own-token" not in log


def test_a_token_file_others_can_read_is_refused_and_left_alone(tmp_path: Path) -> None:
    kept = tmp_path / "token"
    kept.write_text("leaked-token-0123456789abcdef\n")
    kept.chmod(0o644)
    token, log = _start_and_read_token(free_port(), {}, "--token-file", str(kept))
    assert token and token != "leaked-token-0123456789abcdef"
    assert f"{kept} can be read by others (mode 644)" in log and "chmod 600" in log, log
    assert kept.read_text() == "leaked-token-0123456789abcdef\n"
    assert "leaked-token" not in log
