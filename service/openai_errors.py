"""OpenAIErrorShape (pure ASGI): under `/v1/` every error is OpenAI's
`{"error": {"message", "type", "code", "param"}}`, with the status our own routes give.

Errors come from many places (handlers, request validation, the request middleware's 408, 413,
415 and 503), all as problem+json; rewriting that one shape at the outermost layer, for the
`/v1/` paths only, converts all of them and leaves every other route's errors as they are.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.openai_compat import error_body

PREFIX = "/v1/"
_PROBLEM = b"application/problem+json"


class OpenAIErrorShape:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = bytearray()

        async def rewriting(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if content_type.startswith(_PROBLEM):
                    start = message  # held until the whole problem is read
                    return
            elif start is not None and message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if message.get("more_body", False):
                    return
                rewritten = orjson.dumps(error_body(orjson.loads(bytes(body))))
                headers = [
                    (name, value)
                    for name, value in start.get("headers", [])
                    if name not in (b"content-type", b"content-length")
                ]
                headers += [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(rewritten)).encode()),
                ]
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": rewritten})
                return
            await send(message)

        await self.app(scope, receive, rewriting)
