"""Control: the token (bearer and cookie), cross-origin refusal, 422s that change nothing, model
and source switches, the pipeline actions and --protect-views."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.security import COOKIE_NAME, RedactTokens
from tests.test_server import BROKEN, TOKEN, PartReader, Running, running_server


@pytest.fixture(scope="module")
def srv() -> Any:
    with running_server() as running:
        running.wait_frames(1)
        yield running


def fresh_result(srv: Running, client: httpx.Client) -> dict[str, Any]:
    """The /results of a frame processed after now (so after any settings change)."""
    seq = srv.wait_frames(2)
    data: dict[str, Any] = client.get("/results").json()
    assert data["seq"] >= seq
    return data


MUTATIONS = [
    ("PATCH", "/api/config", {"threshold": 0.1}),
    ("POST", "/api/pipeline/pause", None),
    ("POST", "/api/pipeline/resume", None),
]


@pytest.mark.parametrize(("method", "path", "body"), MUTATIONS)
def test_mutations_need_the_token(srv: Running, method: str, path: str, body: Any) -> None:
    with srv.client() as anonymous, srv.client("wrong-token") as wrong:
        for client in (anonymous, wrong):
            response = client.request(method, path, json=body)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert "token" in response.json()["detail"]
        assert srv.service.loop.state.value == "running"
        assert srv.service.settings.threshold == 0.0


def test_bearer_token_changes_settings_and_results(srv: Running) -> None:
    with srv.client(TOKEN) as client:
        response = client.patch("/api/config", json={"threshold": 0.3, "top_k": 3})
        assert response.status_code == 200, response.text
        assert response.json()["threshold"] == 0.3 and response.json()["top_k"] == 3
        data = fresh_result(srv, client)
        assert data["threshold"] == 0.3
        assert [r["name"] for r in data["results"]] == ["class0"]  # only 0.5 is above 0.3
        assert client.patch("/api/config", json={"threshold": 0, "top_k": 5}).status_code == 200
        assert len(fresh_result(srv, client)["results"]) == 5


@pytest.mark.parametrize(
    ("body", "field", "kind", "words"),
    [
        # FastAPI validates the typed body (pydantic's words); the route itself knows the models.
        ({"top_k": 0}, "top_k", "greater_than_equal", "greater than or equal to 1"),
        ({"top_k": 5000}, "top_k", "less_than_equal", "less than or equal to 1000"),
        ({"threshold": 2}, "threshold", "less_than_equal", "less than or equal to 1"),
        ({"display_res": "999p"}, "display_res", "literal_error", "'480p', '720p', '1080p' or 'native'"),
        ({"model": "nope"}, "model", "value_error", "unknown model 'nope'"),
        ({"overlay": "maybe"}, "overlay", "bool_parsing", "valid boolean"),
        # Not a live setting (the port), or no setting at all: not a field of the body.
        ({"port": 9999}, "port", "extra_forbidden", "Extra inputs are not permitted"),
        ({"colour": "red"}, "colour", "extra_forbidden", "Extra inputs are not permitted"),
        ({"top_k": 2, "threshold": -1}, "threshold", "greater_than_equal", "greater than or equal to 0"),
    ],
)
def test_bad_values_answer_422_naming_the_field_and_change_nothing(
    srv: Running, body: dict[str, Any], field: str, kind: str, words: str
) -> None:
    with srv.client(TOKEN) as client:
        before = client.get("/api/config").json()
        response = client.patch("/api/config", json=body)
        assert response.status_code == 422, response.text
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", field]
        assert error["type"] == kind
        assert words in error["msg"]
        assert client.get("/api/config").json() == before


def test_malformed_and_oversized_bodies(srv: Running) -> None:
    with srv.client(TOKEN) as client:
        assert client.patch("/api/config", content=b"{not json").status_code == 422
        assert client.patch("/api/config", json=[1, 2]).status_code == 422
        big = b'{"source": "' + b"x" * 20000 + b'"}'
        assert client.patch("/api/config", content=big).status_code == 413


def test_a_model_that_fails_to_load_is_refused_and_the_old_one_keeps_running(
    srv: Running, tmp_path: Path
) -> None:
    broken = tmp_path / BROKEN
    broken.write_bytes(b"not a model")
    with srv.client(TOKEN) as client:
        response = client.patch("/api/config", json={"model": str(broken)})
        assert response.status_code == 422
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", "model"] and "not an ONNX graph" in error["msg"]
        assert client.get("/api/config").json()["model"] == ""
        assert fresh_result(srv, client)["model"]["name"] == "fake"


def test_model_switch_to_a_builtin(srv: Running) -> None:
    with srv.client(TOKEN) as client:
        response = client.patch("/api/config", json={"model": "catdog"})
        assert response.status_code == 200 and response.json()["model"] == "catdog"
        assert fresh_result(srv, client)["model"]["name"] == "catdog"
        assert client.patch("/api/config", json={"model": ""}).status_code == 200
        assert fresh_result(srv, client)["model"]["name"] == "fake"


def test_a_source_that_cannot_open_is_refused(srv: Running, tmp_path: Path) -> None:
    with srv.client(TOKEN) as client:
        response = client.patch("/api/config", json={"source": str(tmp_path / "missing.mp4")})
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "source"]
        assert client.get("/api/config").json()["source"] == srv.settings.source
        fresh_result(srv, client)


def test_pipeline_actions(srv: Running) -> None:
    with srv.client(TOKEN) as client:
        assert client.post("/api/pipeline/pause").json() == {"action": "pause", "state": "paused",
                                                              "changed": True}
        assert client.get("/results").json()["state"] == "paused"
        assert client.post("/api/pipeline/resume").json()["state"] == "running"
        assert client.post("/api/pipeline/stop").json()["state"] == "stopped"
        assert client.get("/results").json()["state"] == "stopped"
        assert client.post("/api/pipeline/start").json()["state"] == "running"
        assert fresh_result(srv, client)["state"] == "running"
        assert client.post("/api/pipeline/explode").status_code == 422


def test_pipeline_actions_that_do_not_apply_answer_409_and_repeats_change_nothing(
    srv: Running,
) -> None:
    with srv.client(TOKEN) as client:
        try:
            assert client.post("/api/pipeline/stop").json()["changed"] is True
            # Nothing to pause or resume on a stopped pipeline: a 409 that says what to do.
            for action in ("pause", "resume"):
                refused = client.post(f"/api/pipeline/{action}")
                assert refused.status_code == 409, refused.text
                body = refused.json()
                assert body["state"] == "stopped"
                assert f"cannot {action}" in body["detail"] and "start it" in body["detail"]
                assert srv.service.state.value == "stopped"
            # An action whose state is already reached is a 200 that changed nothing.
            assert client.post("/api/pipeline/stop").json() == {
                "action": "stop", "state": "stopped", "changed": False}
            assert client.post("/api/pipeline/start").json()["changed"] is True
            assert client.post("/api/pipeline/start").json() == {
                "action": "start", "state": "running", "changed": False}
            assert client.post("/api/pipeline/resume").json()["changed"] is False
            assert client.post("/api/pipeline/pause").json()["changed"] is True
            assert client.post("/api/pipeline/pause").json()["changed"] is False
            assert client.post("/api/pipeline/resume").json() == {
                "action": "resume", "state": "running", "changed": True}
        finally:
            client.post("/api/pipeline/start")
            client.post("/api/pipeline/resume")
        assert fresh_result(srv, client)["state"] == "running"


def test_stop_releases_the_source_and_start_opens_it_again(srv: Running) -> None:
    capture = srv.service.capture
    with srv.client(TOKEN) as client:
        try:
            assert client.post("/api/pipeline/stop").json()["state"] == "stopped"
            assert not capture._open, "a stopped pipeline keeps its camera open"
            assert srv.service.loop.model is not None, "the model stays loaded"
        finally:
            client.post("/api/pipeline/start")
        assert fresh_result(srv, client)["state"] == "running"
        assert capture._open


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event type, data) for each event of an open SSE response."""
    kind, data = "message", ""
    for line in response.iter_lines():
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif not line and data:
            yield kind, json.loads(data)
            kind, data = "message", ""


def next_event(events: Iterator[tuple[str, dict[str, Any]]], kind: str,
               where: Callable[[dict[str, Any]], bool] = lambda data: True) -> dict[str, Any]:
    """The next ``kind`` event whose data satisfies ``where`` (results stream by meanwhile)."""
    for _ in range(5000):
        got, data = next(events)
        if got == kind and where(data):
            return data
    raise AssertionError(f"no {kind} event")


def test_the_event_stream_pushes_the_live_settings_and_the_pipeline_state(srv: Running) -> None:
    with srv.client(TOKEN) as client, srv.client() as viewer, \
            viewer.stream("GET", "/results/events") as response:
        events = sse_events(response)
        # At connect, before any result: what the page's controls must show.
        first = [next(events), next(events)]
        assert [kind for kind, _ in first] == ["config", "state"]
        assert first[0][1] == client.get("/api/config").json()
        assert first[1][1]["state"] == "running"
        assert first[1][1]["actions"] == ["pause", "stop"]
        try:
            # Another client's change reaches every open page.
            assert client.patch("/api/config", json={"threshold": 0.25, "top_k": 2}).status_code == 200
            config = next_event(events, "config")
            assert config["threshold"] == 0.25 and config["top_k"] == 2
            # Paused, no result comes: the state is pushed on its own.
            assert client.post("/api/pipeline/pause").status_code == 200
            paused = next_event(events, "state", lambda data: data["state"] != "running")
            assert paused == {"state": "paused", "actions": ["resume", "stop"]}
            assert client.post("/api/pipeline/stop").status_code == 200
            stopped = next_event(events, "state", lambda data: data["state"] != "paused")
            assert stopped == {"state": "stopped", "actions": ["start"]}
            assert client.post("/api/pipeline/start").status_code == 200
            assert next_event(events, "state", lambda data: data["state"] != "stopped")["state"] == "running"
        finally:
            client.post("/api/pipeline/start")
            client.patch("/api/config", json={"threshold": 0, "top_k": 5})


def test_cookie_flow_without_leaking_the_token(srv: Running) -> None:
    with srv.client() as browser:
        opened = browser.get("/", params={"token": TOKEN})
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        cookie = opened.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE_NAME}=")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert TOKEN not in cookie, "the cookie holds a derived value, not the token"
        page = browser.get("/")
        assert page.status_code == 200 and "Read-only" not in page.text
        assert TOKEN not in page.text
        assert browser.post("/api/pipeline/resume").status_code == 200
        assert TOKEN not in browser.get("/api/config").text
        # The browser marks a request from another site; so does its Origin header.
        cross = browser.post("/api/pipeline/resume", headers={"Sec-Fetch-Site": "cross-site"})
        assert cross.status_code == 403
        evil = browser.post("/api/pipeline/pause", headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403
        same = browser.post("/api/pipeline/resume",
                            headers={"Origin": srv.url, "Sec-Fetch-Site": "same-origin"})
        assert same.status_code == 200
        assert srv.service.loop.state.value == "running"
    with srv.client() as stranger:
        page = stranger.get("/")
        assert page.status_code == 200 and "Read-only" in page.text
        wrong = stranger.get("/", params={"token": "guess"})
        assert wrong.status_code == 401 and "not valid" in wrong.text
        assert COOKIE_NAME not in wrong.headers.get("set-cookie", "")
        stranger.cookies.set(COOKIE_NAME, TOKEN)  # the raw token is not a valid cookie
        assert stranger.post("/api/pipeline/pause").status_code == 401


def test_protect_views_requires_the_token_for_views_but_not_health() -> None:
    with running_server(protect_views=True) as srv, srv.client() as anonymous, \
            srv.client(TOKEN) as bearer:
        srv.wait_frames(1)
        for path in ("/results", "/snapshot.jpg", "/stream.mjpg", "/results/events", "/api/stats",
                     "/api/config", "/api/iot/messages"):
            assert anonymous.get(path).status_code == 401, path
        assert anonymous.get("/").status_code == 401
        assert anonymous.get("/health").status_code == 200
        assert bearer.get("/results").status_code == 200
        assert anonymous.get("/results", params={"token": TOKEN}).status_code == 200
        assert anonymous.get("/snapshot.jpg", params={"token": TOKEN}).status_code == 200
        with anonymous.stream("GET", "/stream.mjpg", params={"token": TOKEN}) as response:
            assert response.status_code == 200
            PartReader(response.iter_bytes()).next()
        # ?token= is for <img> and ffmpeg URLs; it does not authorize changes.
        assert anonymous.post("/api/pipeline/pause", params={"token": TOKEN}).status_code == 401


def test_access_log_lines_never_show_the_token() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", f"/stream.mjpg?res=480p&token={TOKEN}", "1.1", 200), None,
    )
    assert RedactTokens().filter(record)
    line = record.getMessage()
    assert TOKEN not in line and "token=***" in line and "res=480p" in line
