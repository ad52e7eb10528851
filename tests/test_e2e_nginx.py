"""The load balancer for real: nginx with the project's own deploy/nginx.conf in front of three
`python -m service` replicas (and, for one test, in front of a scripted upstream).

nginx.conf is copied unchanged except for its `listen` port; the replica list goes into the
upstreams.conf it includes, as Compose's does. nginx comes from the system (Debian's `nginx`
package, which .ci/run installs).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.polling import wait_until
from tests.processes import (
    E2E_CLIENT_KEY,
    GatewayControl,
    GatewayProcess,
    ManagedProcess,
    Replica,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
AUTH = {"Authorization": f"Bearer {E2E_CLIENT_KEY}"}
REPLY_PREFIX = "reply to: "
LISTEN = "listen 8080;"
WAIT_SECONDS = 15.0

Json = dict[str, Any]


def nginx_binary() -> str:
    found = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if found is None:
        pytest.fail("no nginx binary: `apt-get install -y nginx` (as .ci/run does)")
    return found


def start_nginx(upstream_ports: list[int], prefix: Path) -> ManagedProcess:
    """deploy/nginx.conf as it is (but its port), proxying to 127.0.0.1:<upstream_ports>."""
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = (DEPLOY / "nginx.conf").read_text()
    assert conf.count(LISTEN) == 1, f"deploy/nginx.conf should have one `{LISTEN}`"
    (prefix / "nginx.conf").write_text(conf.replace(LISTEN, f"listen 127.0.0.1:{port};"))
    (prefix / "upstreams.conf").write_text(
        "".join(f"server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;\n" for p in upstream_ports)
    )
    # pid and daemon are left to the runner by nginx.conf; as root, workers would otherwise
    # switch to `nobody`, who cannot enter pytest's private temporary folders.
    main_context = f"daemon off; pid {prefix}/nginx.pid;"
    if os.geteuid() == 0:
        main_context += " user root;"
    argv = [nginx_binary(), "-e", "stderr", "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")]
    check = subprocess.run(
        [*argv, "-t", "-g", main_context], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr
    log_path = prefix / "nginx.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*argv, "-g", main_context],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    nginx = ManagedProcess(f"nginx-{port}", port, process, log_path)
    try:
        nginx.wait_ready("/nginx-health")
    except BaseException:
        nginx.kill()
        raise
    return nginx


@pytest.fixture(scope="module")
def nginx(
    replicas: list[Replica], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ManagedProcess]:
    """nginx balancing over the module's three replicas; its access log is in `log_path`."""
    process = start_nginx([r.port for r in replicas], tmp_path_factory.mktemp("nginx"))
    yield process
    process.stop()


@pytest.fixture
async def http(nginx: ManagedProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=nginx.url, headers=AUTH, timeout=30.0) as client:
        yield client


def turn(content: str) -> Json:
    return {"message": {"role": "user", "content": content}}


def new_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


async def post_turn(http: httpx.AsyncClient, conversation_id: str, content: str) -> Json:
    response = await http.post(f"/conversations/{conversation_id}/messages", json=turn(content))
    assert response.status_code == 200, response.text
    body: Json = response.json()
    return body


async def stored(http: httpx.AsyncClient, conversation_id: str) -> list[tuple[str, str]]:
    response = await http.get(f"/conversations/{conversation_id}/messages", params={"limit": 200})
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["has_more"] is False
    return [(m["role"], m["content"]) for m in page["messages"]]


def forwarded(bodies: list[Json], marker: str) -> list[list[tuple[str, str]]]:
    """What the gateway was sent for one conversation's turns, in arrival order."""
    return [
        [(m["role"], m["content"]) for m in body["messages"]]
        for body in bodies
        if marker in body["messages"][-1]["content"]
    ]


async def test_concurrent_conversations_keep_every_turn_in_order(
    http: httpx.AsyncClient,
    nginx: ManagedProcess,
    replicas: list[Replica],
    gateway_control: GatewayControl,
) -> None:
    conversations = [new_id(f"lb{n}") for n in range(6)]
    turns = 5

    async def talk(conversation_id: str) -> None:
        for k in range(1, turns + 1):
            reply = await post_turn(http, conversation_id, f"{conversation_id} turn {k}")
            assert reply["conversation"]["message_count"] == 2 * k

    await asyncio.gather(*(talk(c) for c in conversations))

    bodies = await gateway_control.received()
    assert len(bodies) == len(conversations) * turns
    for conversation_id in conversations:
        expected: list[tuple[str, str]] = []
        for k in range(1, turns + 1):
            question = f"{conversation_id} turn {k}"
            expected += [("user", question), ("assistant", REPLY_PREFIX + question)]
        assert await stored(http, conversation_id) == expected
        sent = forwarded(bodies, conversation_id)
        assert sent == [expected[: 2 * k - 1] for k in range(1, turns + 1)]

    ports = {str(r.port) for r in replicas}

    def every_replica_served() -> bool:
        used = re.findall(r" upstream=127\.0\.0\.1:(\d+) ", nginx.log_path.read_text())
        return set(used) == ports

    wait_until(every_replica_served, timeout=WAIT_SECONDS, what="turns on all three replicas")


async def test_simultaneous_turns_of_one_conversation_are_serialized(
    http: httpx.AsyncClient, gateway_control: GatewayControl
) -> None:
    """Sent at once, spread over the replicas: each turn still sees every earlier one."""
    conversation_id = new_id("burst")
    # A slow gateway, so the turns really overlap and wait on each other's lock.
    await gateway_control.configure(delay_seconds=0.2)
    questions = [f"{conversation_id} q{n}" for n in range(6)]

    replies = await asyncio.gather(*(post_turn(http, conversation_id, q) for q in questions))

    assert sorted(r["conversation"]["message_count"] for r in replies) == list(range(2, 13, 2))
    history = await stored(http, conversation_id)
    assert sorted(content for role, content in history if role == "user") == sorted(questions)
    for (role, content), (next_role, answer) in zip(history[::2], history[1::2], strict=True):
        assert (role, next_role) == ("user", "assistant")
        assert answer == REPLY_PREFIX + content
    sent = forwarded(await gateway_control.received(), conversation_id)
    assert sorted(sent, key=len) == [history[: 2 * k + 1] for k in range(len(questions))]


async def test_streamed_turn_through_nginx(
    http: httpx.AsyncClient, gateway_control: GatewayControl
) -> None:
    conversation_id = new_id("sse")
    body = {**turn("stream me please"), "stream": True}
    async with http.stream(
        "POST", f"/conversations/{conversation_id}/messages", json=body
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"conversation"' in events[-2]
    assert await stored(http, conversation_id) == [
        ("user", "stream me please"),
        ("assistant", REPLY_PREFIX + "stream me please"),
    ]


async def test_request_id_is_passed_through_or_minted_once(
    http: httpx.AsyncClient, gateway_process: GatewayProcess, nginx: ManagedProcess
) -> None:
    given = await http.post(
        f"/conversations/{new_id('rid')}/messages",
        json=turn("with an id"),
        headers={"X-Request-ID": "client-chosen-id-1"},
    )
    minted = await http.post(f"/conversations/{new_id('rid')}/messages", json=turn("no id"))
    assert given.status_code == minted.status_code == 200
    assert given.headers["x-request-id"] == "client-chosen-id-1"
    minted_id = minted.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", minted_id)

    async with httpx.AsyncClient(base_url=gateway_process.url) as control:
        received = (await control.get("/_received")).json()["headers"]
    upstream_ids = [headers.get("x-request-id") for headers in received]
    assert "client-chosen-id-1" in upstream_ids
    # The id nginx minted is the one the service used, upstream and in its answer.
    assert minted_id in upstream_ids
    wait_until(
        lambda: f"request_id={minted_id}" in nginx.log_path.read_text(),
        timeout=WAIT_SECONDS,
        what="nginx's access line with the minted id",
    )


async def test_oversized_body_stops_at_nginx(http: httpx.AsyncClient) -> None:
    too_big = {"message": {"role": "user", "content": "x" * (1024 * 1024 + 1)}}
    response = await http.post(f"/conversations/{new_id('big')}/messages", json=too_big)
    assert response.status_code == 413
    assert "x-request-id" not in response.headers  # answered by nginx, not by a replica
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 413


class ScriptedUpstream:
    """A raw HTTP/1.1 server answering with SSE: one event with the headers, a second when
    `second` is set, the end when `release` is set."""

    def __init__(self) -> None:
        self.second = asyncio.Event()
        self.release = asyncio.Event()
        self.requests: list[tuple[str, dict[str, str]]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.rstrip("\r\n").split("\r\n")
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in header_lines)
            }
            await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append((request_line, headers))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(b"data: first\n\n")
            )
            await writer.drain()
            await self.second.wait()
            writer.write(_chunk(b"data: second\n\n"))
            await writer.drain()
            await self.release.wait()
            writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def test_events_are_relayed_as_they_come(tmp_path: Path) -> None:
    """Each event reaches the client while the upstream is still in the middle of its answer.

    The first comes with the response headers, the second alone. (nginx 1.22 relays both even
    with buffering on, as long as the client keeps up; `proxy_buffering off` on this route,
    checked in test_deploy.py, also keeps a slow reader from making nginx spool to disk.)"""
    upstream = ScriptedUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    nginx = await asyncio.to_thread(start_nginx, [port], tmp_path / "nginx")
    try:
        async with (
            httpx.AsyncClient(base_url=nginx.url, timeout=10.0) as client,
            client.stream(
                "POST",
                "/conversations/c-1/messages",
                json={**turn("hi"), "stream": True},
                headers={"X-Request-ID": "stream-through-1"},
            ) as response,
        ):
            lines = response.aiter_lines()
            async with asyncio.timeout(WAIT_SECONDS):
                first = await anext(lines)
            assert first == "data: first"
            upstream.second.set()
            async with asyncio.timeout(WAIT_SECONDS):
                second = await anext(line async for line in lines if line)
            assert second == "data: second"
            upstream.release.set()
            rest = [line async for line in lines if line]
        assert rest == ["data: [DONE]"]
    finally:
        upstream.second.set()
        upstream.release.set()
        server.close()
        await server.wait_closed()
        await asyncio.to_thread(nginx.stop)

    ((request_line, headers),) = upstream.requests
    assert request_line == "POST /conversations/c-1/messages HTTP/1.1"
    assert headers["x-request-id"] == "stream-through-1"
    assert "connection" not in headers  # kept alive: HTTP/1.1 with no `Connection: close`
    assert headers["x-forwarded-for"] == "127.0.0.1"
