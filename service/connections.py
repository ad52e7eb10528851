"""HeaderDeadlineProtocol: uvicorn's HTTP protocol with a deadline for a request's headers.

uvicorn closes a connection that stays idle after a response (`timeout_keep_alive`), but it
never times out a connection that has sent nothing yet, nor headers that trickle in a byte at a
time (any byte cancels the keep-alive timer). Left alone, such clients hold file descriptors for
as long as they like. Here every request's headers must be complete within
HEADER_TIMEOUT_SECONDS of the connection opening or of the request's first byte: a connection
that sent nothing is closed, one that sent part of a request gets 408 and is closed. The body's
deadline is the application's (RequestMiddleware), where it can answer problem+json.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import get_settings
from service.errors import RequestTimeout, problem_bytes


def _timeout_response(limit: float) -> bytes:
    body = problem_bytes(RequestTimeout(f"the request's headers did not arrive within {limit:g} s"))
    head = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\n"
        b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    return head + body


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """Named in uvicorn's `http=` setting. The limit comes from the uvicorn Config's
    `header_timeout_seconds` attribute when set (see `configure`), else from the settings, which
    is how worker processes started by uvicorn itself find it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit = getattr(self.config, "header_timeout_seconds", None)
        self._header_limit: float = limit or get_settings().header_timeout_seconds
        self._header_timer: asyncio.TimerHandle | None = None
        self._request_begun = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override] # uvicorn narrows the base's BaseTransport
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_begun = True
        if self._header_timer is None:  # a keep-alive connection's next request
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._request_begun = False
        super().on_headers_complete()

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self._header_limit, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._request_begun:
            self.transport.write(_timeout_response(self._header_limit))
        self.transport.close()


def configure(config: Any, header_timeout_seconds: float) -> None:
    """Give a uvicorn Config this protocol and its header deadline."""
    config.http = HeaderDeadlineProtocol
    config.header_timeout_seconds = header_timeout_seconds
