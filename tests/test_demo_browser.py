"""The demo page in a real browser: Debian's Chromium driven by Playwright, against two real
`python -m service` replicas (one serves the page, the other the API, so every call is
cross-origin and CORS is exercised) on real Redis and the stand-in gateway process."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from playwright.async_api import Browser, async_playwright, expect

from tests.processes import (
    E2E_GATEWAY_KEY,
    PROJECT_ROOT,
    GatewayControl,
    GatewayProcess,
    Replica,
    accepts_connections,
    start_replicas,
    stop_all,
)
from tests.test_end_users import claims

CHROMIUM = "/usr/bin/chromium"  # Debian's package (make test installs it); no browser download
SECRET = b"demo-browser-test-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def page_and_api(
    redis_url: str, gateway_process: GatewayProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Replica, Replica]]:
    log_dir = tmp_path_factory.mktemp("demo-logs")
    (page,) = start_replicas(1, redis_url, gateway_process.base_url, log_dir=log_dir, DEMO_PAGE="1")
    (api,) = start_replicas(
        1,
        redis_url,
        gateway_process.base_url,
        log_dir=log_dir,
        CORS_ORIGINS=page.url,
        END_USER_JWT_SECRETS=f"acme:{base64.b64encode(SECRET).decode()}",
    )
    yield page, api
    stop_all([page, api])


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        await chromium.close()


async def test_chat_page_streams_reloads_and_shows_a_refusal(
    page_and_api: tuple[Replica, Replica],
    browser: Browser,
    gateway_control: GatewayControl,
    tmp_path: Path,
) -> None:
    page_server, api = page_and_api
    token = jwt.encode(claims(conv="user-1:*"), SECRET, algorithm="HS256")
    address = f"{page_server.url}/demo?api={api.url}&conv=user-1:chat#token={token}"
    await gateway_control.configure(stream_gate=True)  # the stream halts after its first chunk
    page = await browser.new_page()
    failed_requests: list[str] = []
    page.on("requestfailed", lambda request: failed_requests.append(request.url))

    await page.goto(address)
    await expect(page.locator("#meter")).to_have_text("A new conversation.")
    await page.fill("#input", "hello there")
    await page.click("#send")
    reply = page.locator("#log li.assistant")
    # The first chunk is on the page while the gateway still holds the rest of the stream.
    await expect(reply).to_have_text("repl")
    await expect(reply).to_have_attribute("data-state", "streaming")
    await gateway_control.release()
    await expect(reply).to_have_text("reply to: hello there")
    await expect(reply).to_have_attribute("data-state", "done")
    await expect(page.locator("#meter")).to_contain_text("2 messages stored")
    await expect(page.locator("#meter")).to_contain_text("0 dropped")

    await page.reload()
    await expect(page.locator("#log li")).to_have_text(["hello there", "reply to: hello there"])
    await expect(page.locator("#meter")).to_contain_text("2 messages stored")

    await page.goto(f"{page_server.url}/demo?api={api.url}&conv=user-2:chat#token={token}")
    await expect(page.locator("#status")).to_contain_text("403 Forbidden")
    await expect(page.locator("#status")).to_contain_text("does not cover conversation")
    shot = tmp_path / "demo.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0
    assert failed_requests == []

    # The gateway saw the service's key, never the browser's token; the page holds no key.
    headers = await gateway_control.received_headers()
    assert [h["authorization"] for h in headers] == [E2E_GATEWAY_KEY]
    assert token not in str([headers, await gateway_control.received()])
    async with httpx.AsyncClient() as http:
        html = (await http.get(f"{page_server.url}/demo")).text
        off = await http.get(f"{api.url}/demo")
    assert E2E_GATEWAY_KEY not in html
    assert off.status_code == 404  # DEMO_PAGE is off by default


async def test_the_page_picks_up_an_answer_after_a_reload_mid_answer(
    page_and_api: tuple[Replica, Replica],
    browser: Browser,
    gateway_control: GatewayControl,
) -> None:
    """Turns from the page are detached (issue 16): reloading mid-answer loses nothing."""
    page_server, api = page_and_api
    token = jwt.encode(claims(conv="user-1:*"), SECRET, algorithm="HS256")
    address = f"{page_server.url}/demo?api={api.url}&conv=user-1:reload#token={token}"
    await gateway_control.configure(stream_gate=True)  # the stream halts after its first chunk
    page = await browser.new_page()
    await page.goto(address)
    await expect(page.locator("#meter")).to_have_text("A new conversation.")
    await page.fill("#input", "are you still there")
    await page.click("#send")
    reply = page.locator("#log li.assistant")
    await expect(reply).to_have_text("repl")

    await page.reload()  # mid-answer: the connection that carried it is gone
    await expect(page.locator("#log li")).to_have_text(["are you still there", "repl"])
    await expect(reply).to_have_attribute("data-state", "streaming")
    await gateway_control.release()
    await expect(reply).to_have_text("reply to: are you still there")
    await expect(reply).to_have_attribute("data-state", "done")
    await expect(page.locator("#meter")).to_contain_text("2 messages stored")
    assert len(await gateway_control.received()) == 1

    await page.reload()  # once it ended, the history has it, and nothing is read again
    await expect(page.locator("#log li")).to_have_text(
        ["are you still there", "reply to: are you still there"]
    )
    await expect(page.locator("#meter")).to_contain_text("2 messages stored")


def test_make_demo_prints_a_working_url(redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "API_KEYS"))}
    with subprocess.Popen(
        [sys.executable, "-m", "tests.demo_stack"],
        cwd=PROJECT_ROOT,
        env={**env, "REDIS_URL": redis_url},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    ) as launcher:
        try:
            assert launcher.stdout is not None
            lines = [launcher.stdout.readline(), launcher.stdout.readline()]
            assert lines[0].startswith("logs: ")
            assert lines[1].startswith("open: ")
            page_url, _, token = lines[1].removeprefix("open: ").strip().partition("#token=")
            service_url = page_url.removesuffix("/demo")
            page = httpx.get(page_url)
            assert page.status_code == 200
            assert "<title>conversation-proxy: chat demo</title>" in page.text
            turn = httpx.post(
                f"{service_url}/conversations/demo-user:1/messages",
                json={"message": {"role": "user", "content": "hi"}},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert turn.status_code == 200, turn.text
            assert turn.json()["choices"][0]["message"]["content"] == "reply to: hi"
        finally:
            launcher.send_signal(signal.SIGTERM)
            assert launcher.wait(timeout=30) == 0
    assert not accepts_connections(int(service_url.rsplit(":", 1)[1]))
