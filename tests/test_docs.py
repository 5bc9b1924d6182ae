"""The API docs work offline (a device seldom has internet): /docs references no external host,
its assets come from the app, and Swagger UI renders in real Chromium with every request to
another host blocked; /redoc leads there."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest

from tests.conftest import require_tool
from tests.test_page import CHROMIUM_ARGS, WAIT_MS
from tests.test_server import Running, running_server


@pytest.fixture(scope="module")
def srv() -> Iterator[Running]:
    with running_server() as running:
        yield running


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_reference_no_external_host_and_their_assets_are_served(srv: Running, path: str) -> None:
    with srv.client(follow_redirects=True) as client:
        page = client.get(path)
        assert page.status_code == 200
        html = page.text
        assert "swagger-ui" in html
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
        urls += re.findall(r"""url\s*:\s*["']([^"']+)["']""", html)
        urls += re.findall(r"""@import\s+url\(([^)]+)\)""", html)
        assert urls, html
        external = [u for u in urls if urlsplit(urljoin(srv.url + path, u)).netloc
                    != urlsplit(srv.url).netloc]
        assert external == [], f"{path} loads from another host: {external}"
        assert not re.search(r"https?://(?!127\.0\.0\.1)", html.replace(srv.url, "")), html
        scripts = [u for u in urls if u.endswith(".js")]
        assert scripts, html
        for url in urls:
            asset = client.get(urljoin(srv.url + path, url))
            assert asset.status_code == 200, url
            assert asset.content, url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium, headless=True,
                                              args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_render_in_chromium_with_other_hosts_blocked(browser: Any, srv: Running, path: str) -> None:
    own = urlsplit(srv.url).netloc
    blocked: list[str] = []
    context = browser.new_context()
    try:
        def route(r: Any) -> None:
            if urlsplit(r.request.url).netloc == own or r.request.url.startswith("data:"):
                r.continue_()
            else:
                blocked.append(r.request.url)
                r.abort()

        context.route("**/*", route)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(srv.url + path)
        page.wait_for_selector(".swagger-ui .opblock-summary-path")
        assert page.url == srv.url + "/docs"
        text = page.inner_text("body")
        assert "/results" in text and "/health" in text, text[:500]
        assert blocked == [], f"{path} tried other hosts: {blocked}"
    finally:
        context.close()
