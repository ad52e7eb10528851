"""The ServiceError hierarchy and the one renderer of problem+json: every error answer, whether
built by a route, a handler, the ASGI middleware or the HTTP protocol, is a ServiceError encoded
by `problem_bytes`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute

PROBLEM_JSON = "application/problem+json"


class ServiceError(Exception):
    """Base of every error the service answers with; subclasses set status and title."""

    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    slug: ClassVar[str] = "internal-error"

    def __init__(
        self, detail: str = "", *, headers: dict[str, str] | None = None, status: int | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail or self.title
        self.headers = headers or {}
        self.status_override = status

    @property
    def status_code(self) -> int:
        return self.status_override or self.status

    def problem(self) -> dict[str, Any]:
        """The RFC 9457 body; `about:blank` for plain HTTP errors that need no type of their own."""
        kind = self.slug if self.slug == "about:blank" else f"/problems/{self.slug}"
        status, detail = self.status_code, self.detail
        return {"type": kind, "title": self.title, "status": status, "detail": detail}


class MalformedJson(ServiceError):
    status = 400
    title = "Malformed JSON"
    slug = "malformed-json"

    def __init__(self) -> None:
        super().__init__("the body is not valid JSON")


class RequestTimeout(ServiceError):
    status = 408
    title = "Request timeout"
    slug = "request-timeout"


class PayloadTooLarge(ServiceError):
    status = 413
    title = "Payload too large"
    slug = "payload-too-large"


class UnsupportedMediaType(ServiceError):
    status = 415
    title = "Unsupported media type"
    slug = "unsupported-media-type"


class Overloaded(ServiceError):
    status = 503
    title = "Overloaded"
    slug = "overloaded"


class RouteNotFound(ServiceError):
    status = 404
    title = "Not found"
    slug = "about:blank"


class MethodNotAllowed(ServiceError):
    status = 405
    title = "Method not allowed"
    slug = "about:blank"


class HttpError(ServiceError):
    """Any other status Starlette raises by itself; the instance carries the status."""

    title = "HTTP error"
    slug = "about:blank"


class InvalidRequest(ServiceError):
    status = 422
    title = "Invalid request"
    slug = "invalid-request"


class Unauthorized(ServiceError):
    status = 401
    title = "Unauthorized"
    slug = "unauthorized"


class Forbidden(ServiceError):
    status = 403
    title = "Forbidden"
    slug = "forbidden"


class RateLimited(ServiceError):
    status = 429
    title = "Rate limit"
    slug = "rate-limit"


class ConversationNotFound(ServiceError):
    status = 404
    title = "Conversation not found"
    slug = "not-found"


class ConversationBusy(ServiceError):
    status = 409
    title = "Conversation busy"
    slug = "conversation-busy"


class IdempotentRequestInFlight(ServiceError):
    status = 409
    title = "Request with this Idempotency-Key still running"
    slug = "idempotency-in-flight"


class IdempotencyKeyReused(ServiceError):
    status = 422
    title = "Idempotency-Key reused with another body"
    slug = "idempotency-key-reused"


class OverTokenBudget(ServiceError):
    status = 413
    title = "New messages exceed the token budget"
    slug = "over-token-budget"


class GatewayRateLimited(ServiceError):
    status = 429
    title = "Gateway rate limit"
    slug = "rate-limited"


class GatewayRejected(ServiceError):
    """The gateway refused the request as the client's fault; carries the gateway's status."""

    status = 400
    title = "Gateway rejected the request"
    slug = "gateway-rejected"


class GatewayError(ServiceError):
    status = 502
    title = "Bad gateway"
    slug = "bad-gateway"


class GatewayTimeout(ServiceError):
    status = 504
    title = "Gateway timeout"
    slug = "gateway-timeout"


class StoreUnavailable(ServiceError):
    status = 503
    title = "Storage unavailable"
    slug = "store-unavailable"


def problem_bytes(error: ServiceError) -> bytes:
    return orjson.dumps(error.problem())


def problem_response(error: ServiceError) -> Response:
    return Response(
        problem_bytes(error),
        status_code=error.status_code,
        media_type=PROBLEM_JSON,
        headers=error.headers,
    )


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:10]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _allowed_methods(routes: Sequence[BaseRoute], path: str) -> list[str]:
    return sorted(
        {
            method
            for route in routes
            if isinstance(route, APIRoute) and route.path_regex.match(path)
            for method in route.methods or ()
        }
    )


def install_error_handlers(app: FastAPI, routes: Sequence[BaseRoute]) -> None:
    """Problem+json for every error; `routes` are the app's own, for 405's Allow header."""

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> Response:
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return problem_response(MalformedJson())
        return problem_response(InvalidRequest(_validation_detail(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return problem_response(_from_http_exception(exc, routes, request.url.path))


def _from_http_exception(
    exc: StarletteHTTPException, routes: Sequence[BaseRoute], path: str
) -> ServiceError:
    headers = dict(exc.headers or {})
    detail = str(exc.detail)
    match exc.status_code:
        case 400:  # FastAPI could not read the body as JSON at all
            return MalformedJson()
        case 404:
            return RouteNotFound(detail, headers=headers)
        case 405:  # every method of the path, not only the first route's
            headers["Allow"] = ", ".join(_allowed_methods(routes, path))
            return MethodNotAllowed(detail, headers=headers)
        case 408:
            return RequestTimeout(detail, headers=headers)
        case 413:
            return PayloadTooLarge(detail, headers=headers)
        case status:
            return HttpError(detail, headers=headers, status=status)
