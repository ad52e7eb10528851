"""The stand-in gateway as a real HTTP server, for end-to-end tests with several replicas.

`python -m tests.gateway_server PORT` serves POST /v1/chat/completions with FakeGateway's logic,
plus control routes for tests: GET /_received (bodies received, in order; summary calls apart),
POST /_config (JSON: delay_seconds, hold, stream_gate, summary_hold, ignore_stream, chunk_size,
...), POST /_release (let held calls, gated streams and held summary calls go on), POST /_reset.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson
from aiohttp import web

from tests.fake_gateway import FakeGateway, send


class GatewayServer:
    def __init__(self) -> None:
        self.fake = FakeGateway()
        self.delay_seconds = 0.0

    async def completions(self, request: web.Request) -> web.StreamResponse:
        status, headers, content = await self.fake.respond(
            dict(request.headers), await request.json()
        )
        if (
            self.delay_seconds
        ):  # a slow gateway (after recording the call), not test synchronisation
            await asyncio.sleep(self.delay_seconds)
        return await send(request, status, headers, content)

    async def received(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(
                {
                    "received": self.fake.received,
                    "headers": self.fake.received_headers,
                    "summary_received": self.fake.summary_received,
                }
            ),
            content_type="application/json",
        )

    async def configure(self, request: web.Request) -> web.Response:
        config: dict[str, Any] = orjson.loads(await request.read())
        if "delay_seconds" in config:
            self.delay_seconds = float(config.pop("delay_seconds"))
        if config.pop("hold", False):
            self.fake.hold = asyncio.Event()
        if config.pop("stream_gate", False):  # streams pause after their first chunk
            self.fake.stream_gate = asyncio.Event()
        if config.pop("summary_hold", False):  # summary calls wait
            self.fake.summary_hold = asyncio.Event()
        for name, value in config.items():
            setattr(self.fake, name, value)
        return web.Response(status=204)

    async def release(self, _request: web.Request) -> web.Response:
        if self.fake.hold is not None:
            self.fake.hold.set()
            self.fake.hold = None
        if self.fake.stream_gate is not None:
            self.fake.stream_gate.set()
            self.fake.stream_gate = None
        if self.fake.summary_hold is not None:
            self.fake.summary_hold.set()
            self.fake.summary_hold = None
        return web.Response(status=204)

    async def reset(self, _request: web.Request) -> web.Response:
        self.fake = FakeGateway()
        self.delay_seconds = 0.0
        return web.Response(status=204)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", lambda request: self.fake.models(request))
        app.router.add_get("/_received", self.received)
        app.router.add_post("/_config", self.configure)
        app.router.add_post("/_release", self.release)
        app.router.add_post("/_reset", self.reset)
        return app


if __name__ == "__main__":
    web.run_app(
        GatewayServer().app(),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        access_log=None,
        print=None,
        shutdown_timeout=1,
    )
