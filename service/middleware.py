"""RequestMiddleware (pure ASGI): request ids, the body-size limit and deadline, the concurrency
cap, metrics and the access log."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import time
import weakref
from collections.abc import Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import (
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    UnsupportedMediaType,
    problem_bytes,
)
from service.ids import random_id
from service.logs import FIELDS, begin_request

log = logging.getLogger("service.access")

# A client's id is kept if it is visible ASCII of sensible length (it goes into logs and upstream).
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,200}$")


def _json_or_unset(headers: dict[bytes, bytes]) -> bool:
    """No Content-Type (read as JSON), application/json, or any +json type."""
    content_type = headers.get(b"content-type")
    if content_type is None:
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


# An import's body is JSON Lines (service/editing_routes.py), under any of its usual names.
_JSON_LINES = (b"application/jsonl", b"application/x-ndjson", b"application/x-jsonlines")


def _accepted_media(headers: dict[bytes, bytes], path: str) -> bool:
    if _json_or_unset(headers):
        return True
    media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    return path.endswith("/import") and media in _JSON_LINES


class BodyTooLarge(HTTPException):
    """Raised from `receive`: an HTTPException, so FastAPI's body parsing lets it through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the body is over {limit} bytes")


class BodyTimeout(HTTPException):
    """The body did not arrive within BODY_TIMEOUT_SECONDS: a slow client holds a request slot."""

    def __init__(self, limit: float) -> None:
        super().__init__(
            408, f"the body did not arrive within {limit:g} s", headers={"Connection": "close"}
        )


# Probes and scrapes are served even at the cap: an overloaded pod is not a dead one.
_UNCAPPED = frozenset({"/healthz", "/readyz", "/metrics"})


@functools.lru_cache(maxsize=4096)  # a few tenants, one hash each per request (issue 10)
def tenant_hash(tenant: str) -> str:
    return hashlib.sha256(tenant.encode()).hexdigest()[:12]


def cors_headers(origins: frozenset[str], origin: bytes | None) -> list[tuple[bytes, bytes]]:
    """What CORSMiddleware adds to a simple response, for the answers built here, outside it:
    without them a browser sees a 413 or 500 as an unreadable network failure."""
    if origin is None or not origins:
        return []
    if "*" in origins:
        allowed = b"*"
    elif origin.decode("latin-1") in origins:
        allowed = origin
    else:
        return []
    return [
        (b"access-control-allow-origin", allowed),
        (b"access-control-expose-headers", CORS_EXPOSED.encode()),
        (b"vary", b"Origin"),
    ]


CORS_EXPOSED = (
    "X-Request-ID, Idempotent-Replayed, Retry-After, "
    "RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, RateLimit-Policy, "
    "X-Conversation-Id, X-Conversation-Messages, X-Context-Messages, X-Context-Tokens, "
    "X-Context-Dropped"
)


class RequestMiddleware:
    """Pure ASGI around the app. `convproxy_requests_in_flight` is read off its count when
    scraped (a gauge's inc and dec take a lock, twice a request)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        cors_origins: Sequence[str] = (),
        body_timeout_seconds: float = 30.0,
        max_concurrency: int = 2000,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.cors_origins = frozenset(cors_origins)
        self.body_timeout_seconds = body_timeout_seconds
        self.max_concurrency = max_concurrency
        self._in_flight = 0
        _LIVE.add(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else random_id()
        scope.setdefault("state", {})["request_id"] = request_id
        fields = begin_request()
        status = 500
        response_started = False
        id_header = (b"x-request-id", request_id.encode())
        cors = cors_headers(self.cors_origins, headers.get(b"origin"))

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        received = 0
        body_deadline = started + self.body_timeout_seconds
        body_done = False

        async def receive_wrapper() -> Message:
            nonlocal received, body_done
            if body_done:  # later calls wait for a disconnect, for as long as the answer takes
                return await receive()
            try:
                async with asyncio.timeout(max(0.0, body_deadline - time.perf_counter())):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.body_timeout_seconds) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        if self._in_flight >= self.max_concurrency and scope["path"] not in _UNCAPPED:
            metrics.OVERLOADED.inc()
            busy = f"this replica is serving {self.max_concurrency} requests (MAX_CONCURRENCY)"
            await self._problem(send_wrapper, cors, Overloaded(busy, headers={"Retry-After": "1"}))
            self._record(scope, fields, request_id, status, time.perf_counter() - started)
            return
        self._in_flight += 1
        try:
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                raise BodyTooLarge(self.max_body_bytes)
            if scope["method"] in ("POST", "PUT") and not _accepted_media(headers, scope["path"]):
                json_only = UnsupportedMediaType("send the body as application/json")
                await self._problem(send_wrapper, cors, json_only)
                return
            await self.app(scope, receive_wrapper, send_wrapper)
        except BodyTooLarge:
            if response_started:
                raise
            too_large = PayloadTooLarge(f"the body is over {self.max_body_bytes} bytes")
            await self._problem(send_wrapper, cors, too_large)
        except BodyTimeout as exc:
            if response_started:
                raise
            await self._problem(send_wrapper, cors, RequestTimeout(exc.detail))
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            if response_started:
                raise
            await self._problem(send_wrapper, cors, ServiceError("an unexpected error occurred"))
        finally:
            self._in_flight -= 1
            self._record(scope, fields, request_id, status, time.perf_counter() - started)

    @staticmethod
    async def _problem(send: Send, cors: list[tuple[bytes, bytes]], error: ServiceError) -> None:
        """Answers built here, outside the app (and its CORS middleware); the connection closes,
        since the request's body may be unread."""
        body = problem_bytes(error)
        headers = [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
        await send(
            {
                "type": "http.response.start",
                "status": error.status_code,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    *headers,
                    *cors,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _record(
        scope: Scope, fields: dict[str, Any], request_id: str, status: int, elapsed: float
    ) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope["method"]
        metrics.child(metrics.REQUESTS, route, method, str(status)).inc()
        metrics.child(metrics.LATENCY, route, method, str(status)).observe(elapsed)
        if route in ("/metrics", "/healthz", "/readyz") and status < 400:
            return
        entry: dict[str, Any] = {
            "request_id": request_id,
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": round(elapsed * 1000, 3),
        }
        path_params = scope.get("path_params") or {}
        if "conversation_id" in path_params:
            entry["conversation_id"] = path_params["conversation_id"]
        tenant = fields.pop("tenant", None)
        if tenant is not None:
            entry["tenant"] = tenant_hash(tenant)
        entry.update(fields)
        log.info("request", extra={FIELDS: entry})


_LIVE: weakref.WeakSet[RequestMiddleware] = weakref.WeakSet()  # one per app: one in production
metrics.IN_FLIGHT.set_function(lambda: sum(m._in_flight for m in list(_LIVE)))
