"""The bench's reference: the least a stateful turn can do, measured in the same run as the service.

`python -m bench.reference PORT REDIS_URL UPSTREAM_URL WINDOW` serves POST
/conversations/{id}/messages on FastAPI and uvicorn like the service: one Lua read of the last
WINDOW stored messages, the aiohttp POST of them plus the new message upstream, then MULTI
RPUSH + EXPIRE of the new message and the reply. No auth, trimming, lease or idempotency: every
figure of the service is printed as a ratio to this one (issue 10), so a target means the same
on any machine.

With `-` for REDIS_URL it is the floor: the same turn without Redis (a constant window of the
seeded records, nothing written), what FastAPI, uvicorn and aiohttp cost a turn before it does
any work of its own. make bench loads it beside the two, so that what the service and the
reference each spend beyond it can be read off.
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

from bench.upstreams import REPLY_TEXT, USER_TEXT

TENANT = "ref"  # its conversations: conv:{ref:<id>}:log, seeded like the service's
READ = "return redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)"


def create_app(redis_url: str | None, upstream: str, window: int) -> FastAPI:
    """The reference; without `redis_url`, the floor."""
    state: dict[str, Any] = {}
    seeded = [_record(seq) for seq in range(1, window + 1)]  # the floor's window

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # The service's default pool sizes (REDIS_POOL_SIZE, GATEWAY_MAX_CONNECTIONS): the
        # libraries' own (100 each; past 100 Redis connections, an error) fail 500 in flight.
        # redis-py's plain pool, not the service's blocking one: 500 turns never need 512.
        connector = aiohttp.TCPConnector(limit=1000)
        async with aiohttp.ClientSession(connector=connector) as session:
            if redis_url is None:
                state.update(session=session)
                yield
                return
            async with Redis.from_url(redis_url, max_connections=512) as redis:
                state.update(redis=redis, session=session, read=redis.register_script(READ))
                yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/conversations/{conversation_id}/messages")
    async def turn(conversation_id: str, request: Request) -> Response:
        body = orjson.loads(await request.body())
        log = f"conv:{{{TENANT}:{conversation_id}}}:log"
        stored = await state["read"](keys=[log], args=[window]) if redis_url else seeded
        history = [orjson.loads(item) for item in stored]
        messages = [{"role": m["role"], "content": m["content"]} for m in history]
        messages.append(body["message"])
        payload = orjson.dumps({"model": body.get("model"), "messages": messages})
        headers = {"Content-Type": "application/json"}
        async with state["session"].post(upstream, data=payload, headers=headers) as answer:
            completion = await answer.read()
        reply = orjson.loads(completion)["choices"][0]["message"]
        records = orjson.dumps(body["message"]), orjson.dumps(reply)
        if redis_url:
            async with state["redis"].pipeline(transaction=True) as pipe:
                pipe.rpush(log, *records)
                pipe.expire(log, 3600)
                await pipe.execute()
        return Response(completion, media_type="application/json")

    return app


def _record(seq: int) -> bytes:
    """Stored message `seq` as bench/seed.py writes it (user on odd seqs, the assistant on even).
    Not seed.message itself: that would load the service's models and store into the reference's
    process, whose collector (CPython's defaults, nothing frozen) would then walk them too."""
    role, text = ("user", USER_TEXT) if seq % 2 else ("assistant", REPLY_TEXT)
    record = {"tokens": 24, "seq": seq, "role": role, "content": text, "created_at": 0.0}
    return orjson.dumps(record)


if __name__ == "__main__":
    port, redis_url, upstream, window = sys.argv[1:5]
    app = create_app(None if redis_url == "-" else redis_url, upstream, int(window))
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
