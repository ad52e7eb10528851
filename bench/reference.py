"""The bench's reference: the least a stateful turn can do, measured in the same run as the service.

`python -m bench.reference PORT REDIS_URL UPSTREAM_URL WINDOW` serves POST
/conversations/{id}/messages on FastAPI and uvicorn like the service: one Lua read of the last
WINDOW stored messages, the aiohttp POST of them plus the new message upstream, then MULTI
RPUSH + EXPIRE of the new message and the reply. No auth, trimming, lease or idempotency: every
figure of the service is printed as a ratio to this one (issue 10), so a target means the same
on any machine.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import uvicorn
from fastapi import FastAPI, Request, Response
from redis.asyncio import Redis

TENANT = "ref"  # its conversations: conv:{ref:<id>}:log, seeded like the service's
READ = "return redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)"


def create_app(redis_url: str, upstream: str, window: int) -> FastAPI:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # The service's default pool sizes (REDIS_POOL_SIZE, GATEWAY_MAX_CONNECTIONS): the
        # libraries' own (100 each; past 100 Redis connections, an error) fail 500 in flight.
        # redis-py's plain pool, not the service's blocking one: 500 turns never need 512.
        connector = aiohttp.TCPConnector(limit=1000)
        async with (
            Redis.from_url(redis_url, max_connections=512) as redis,
            aiohttp.ClientSession(connector=connector) as session,
        ):
            state.update(redis=redis, session=session, read=redis.register_script(READ))
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/conversations/{conversation_id}/messages")
    async def turn(conversation_id: str, request: Request) -> Response:
        body = orjson.loads(await request.body())
        log = f"conv:{{{TENANT}:{conversation_id}}}:log"
        stored = await state["read"](keys=[log], args=[window])
        history = [orjson.loads(item) for item in stored]
        messages = [{"role": m["role"], "content": m["content"]} for m in history]
        messages.append(body["message"])
        payload = orjson.dumps({"model": body.get("model"), "messages": messages})
        headers = {"Content-Type": "application/json"}
        async with state["session"].post(upstream, data=payload, headers=headers) as answer:
            completion = await answer.read()
        reply = orjson.loads(completion)["choices"][0]["message"]
        async with state["redis"].pipeline(transaction=True) as pipe:
            pipe.rpush(log, orjson.dumps(body["message"]), orjson.dumps(reply))
            pipe.expire(log, 3600)
            await pipe.execute()
        return Response(completion, media_type="application/json")

    return app


if __name__ == "__main__":
    port, redis_url, upstream, window = sys.argv[1:5]
    app = create_app(redis_url, upstream, int(window))
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
