"""The ServiceError hierarchy and the handlers that render every error as problem+json."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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
        return problem_body(self.status_code, self.title, self.detail, self.slug)


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


class SeqBeyondLog(ServiceError):
    """A seq past the log's end: a state the request does not match (the log may have been cut
    by another client), not a malformed request."""

    status = 409
    title = "No such message"
    slug = "seq-beyond-log"


class LogRewritten(ServiceError):
    """A page asked for with the generation of a log that was rewritten since."""

    status = 409
    title = "Log rewritten"
    slug = "log-rewritten"


class NothingToRegenerate(ServiceError):
    """A regenerate of a conversation without a user message: nothing was asked yet."""

    status = 409
    title = "Nothing to regenerate"
    slug = "nothing-to-regenerate"


class ConversationExists(ServiceError):
    status = 409
    title = "Conversation exists"
    slug = "conversation-exists"


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


def problem_body(status: int, title: str, detail: str, slug: str = "about:blank") -> dict[str, Any]:
    kind = slug if slug == "about:blank" else f"/problems/{slug}"
    return {"type": kind, "title": title, "status": status, "detail": detail}


def problem_response(
    status: int,
    title: str,
    detail: str,
    slug: str = "about:blank",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        problem_body(status, title, detail, slug),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
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
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(
            exc.problem(), status_code=exc.status_code, media_type=PROBLEM_JSON, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        malformed = any(e.get("type") == "json_invalid" for e in exc.errors())
        if malformed:
            return problem_response(
                400, "Malformed JSON", "the body is not valid JSON", "malformed-json"
            )
        return problem_response(422, "Invalid request", _validation_detail(exc), "invalid-request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 400:  # FastAPI could not read the body as JSON at all
            return problem_response(
                400, "Malformed JSON", "the body is not valid JSON", "malformed-json"
            )
        if exc.status_code == 413:
            return problem_response(413, "Payload too large", str(exc.detail), "payload-too-large")
        if exc.status_code == 405:  # every method of the path, not only the first route's
            headers["Allow"] = ", ".join(_allowed_methods(routes, request.url.path))
        titles = {404: "Not found", 405: "Method not allowed", 408: "Request timeout"}
        title = titles.get(exc.status_code, "HTTP error")
        return problem_response(exc.status_code, title, str(exc.detail), headers=headers)
