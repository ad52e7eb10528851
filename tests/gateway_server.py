"""The stand-in gateway as a real HTTP server, for end-to-end tests with several replicas.

`python -m tests.gateway_server PORT` serves POST /v1/chat/completions with FakeGateway's logic,
plus control routes for tests: GET /_received (bodies received, in order), POST /_config (JSON:
delay_seconds, hold, ignore_stream, chunk_size, ...), POST /_release (let held calls answer),
POST /_reset.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.fake_gateway import FakeGateway


class GatewayServer:
    def __init__(self) -> None:
        self.fake = FakeGateway()
        self.delay_seconds = 0.0

    async def completions(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        status, headers, content = await self.fake.respond(dict(request.headers), body)
        if (
            self.delay_seconds
        ):  # a slow gateway (after recording the call), not test synchronisation
            await asyncio.sleep(self.delay_seconds)
        if isinstance(content, bytes):
            return Response(content, status_code=status, headers=headers)
        return StreamingResponse(content, status_code=status, headers=headers)

    async def received(self, _request: Request) -> Response:
        return Response(
            orjson.dumps({"received": self.fake.received, "headers": self.fake.received_headers}),
            media_type="application/json",
        )

    async def configure(self, request: Request) -> Response:
        config: dict[str, Any] = orjson.loads(await request.body())
        if "delay_seconds" in config:
            self.delay_seconds = float(config.pop("delay_seconds"))
        if config.pop("hold", False):
            self.fake.hold = asyncio.Event()
        for name, value in config.items():
            setattr(self.fake, name, value)
        return Response(status_code=204)

    async def release(self, _request: Request) -> Response:
        if self.fake.hold is not None:
            self.fake.hold.set()
            self.fake.hold = None
        return Response(status_code=204)

    async def reset(self, _request: Request) -> Response:
        self.fake = FakeGateway()
        self.delay_seconds = 0.0
        return Response(status_code=204)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.completions, methods=["POST"]),
                Route("/_received", self.received, methods=["GET"]),
                Route("/_config", self.configure, methods=["POST"]),
                Route("/_release", self.release, methods=["POST"]),
                Route("/_reset", self.reset, methods=["POST"]),
            ]
        )


if __name__ == "__main__":
    uvicorn.run(GatewayServer().app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
