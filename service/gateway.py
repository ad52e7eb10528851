"""GatewayClient: calls to the LLM gateway, its retry policy, and its wire format.

One client per process, on one aiohttp session: measured by `make bench`, httpx's client costs
2.3x aiohttp's CPU per call even over the httpx-aiohttp transport (and its own pool is ~10x
slower under concurrency, encode/httpx#3215). Failures become ServiceErrors here, at the
boundary; the gateway's error text is passed to the client but never logged.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import aiohttp
import orjson
from pydantic import SecretStr

from service import metrics
from service.errors import GatewayError, GatewayRejected, GatewayTimeout, Unauthorized
from service.ids import random_id
from service.logs import annotate
from service.models import JSONObject
from service.sse import EventTooLarge, ServerSentEvent, SSEDecoder
from service.upstream_errors import error_text, redact, retry_after_seconds, upstream_error
from service.usage import Usage, read_usage

log = logging.getLogger("service.gateway")

BACKOFF_BASE_SECONDS = 0.25
BACKOFF_CAP_SECONDS = 4.0
# Statuses that say the request was not taken on (so it cannot have reached a model), retried only
# when the gateway also says when to come back.
RETRY_AFTER_STATUSES = (429, 503)
MAX_REMEMBERED_MODELS = 1024

AuthScheme = Literal["bearer", "raw"]


@dataclass(frozen=True, slots=True)
class Reply:
    """The parts of a completion the service keeps: the assistant message and usage."""

    message: JSONObject  # role, content, tool_calls where present
    usage: Usage

    @property
    def input_tokens(self) -> int:
        """The prompt's full size, cached parts included."""
        return self.usage.prompt

    @property
    def output_tokens(self) -> int:
        return self.usage.output


@dataclass(slots=True)
class UpstreamStream:
    """An opened streaming call: either SSE events to relay, or a plain JSON completion
    (a model may ignore `stream: true`)."""

    response: aiohttp.ClientResponse
    completion: JSONObject | None = None
    started: float = field(default_factory=time.perf_counter)
    secrets: tuple[str, ...] = ()  # keys to redact from an error the stream itself reports

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        """The upstream's events, parsed to the SSE spec as they arrive; a broken, stalled or
        oversized stream is a ServiceError."""
        decoder = SSEDecoder()
        try:
            async for piece in self.response.content.iter_any():
                for event in decoder.feed(piece):
                    yield event
        except EventTooLarge as exc:
            raise GatewayError(f"the gateway's stream is unreadable: {exc}") from exc
        except TimeoutError as exc:  # no chunk within aiohttp's sock_read
            raise GatewayTimeout("the gateway's stream stalled") from exc
        except aiohttp.ClientError as exc:
            raise GatewayError(f"the gateway's stream broke off ({type(exc).__name__})") from exc

    def error_in(self, body: bytes) -> GatewayError:
        """An error the gateway sent inside the stream, as the client may see it."""
        return GatewayError(
            f"the gateway's stream failed: {redact(error_text(body), self.secrets)}"
        )

    async def aclose(self) -> None:
        """Return the connection when the stream was read to its end; else drop it, which
        cancels the upstream request (a client that went away)."""
        if self.response.content.at_eof():
            self.response.release()
        else:
            self.response.close()


class _Deadline:
    """`asyncio.timeout_at(when)` whose expiry, or a read that outlived the time limit inside
    it, is GatewayTimeout (504). A class, not an async generator: entered twice per turn."""

    __slots__ = ("_limit", "_timeout")

    def __init__(self, when: float, limit: float) -> None:
        self._timeout = asyncio.timeout_at(when)
        self._limit = limit

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self._timeout.__aexit__(kind, exc, tb)
        except TimeoutError as expired:  # our deadline
            raise GatewayTimeout(self._message()) from expired
        if isinstance(exc, TimeoutError):  # a read that outlived the time limit
            raise GatewayTimeout(self._message()) from exc

    def _message(self) -> str:
        return f"the gateway did not answer within {self._limit:g} s"


def record_upstream_time(started: float) -> None:
    """A gateway call's duration (from `started`, a perf_counter reading): metric and log line."""
    elapsed = time.perf_counter() - started
    metrics.UPSTREAM_LATENCY.observe(elapsed)
    annotate(upstream_ms=round(elapsed * 1000, 3))


def parse_reply(completion: Any) -> Reply:
    """Read a completion defensively: tool_calls under the message or (older spec) the choice,
    usage in any shape service/usage.py reads."""
    if not isinstance(completion, dict):
        raise GatewayError("the gateway's answer is not a JSON object")
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise GatewayError("the gateway's answer has no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise GatewayError("the gateway's answer has no message")
    content = message.get("content")
    tool_calls = message.get("tool_calls") or choice.get("tool_calls")
    if content is not None and not isinstance(content, str | list):
        raise GatewayError("the gateway's message content is neither text nor parts")
    if tool_calls is not None and not isinstance(tool_calls, list):
        raise GatewayError("the gateway's tool_calls is not a list")
    if content is None and not tool_calls:
        content = ""
    reply: JSONObject = {"role": "assistant", "content": content}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    return Reply(message=reply, usage=read_usage(completion.get("usage")))


async def _read_json(response: aiohttp.ClientResponse) -> Any:
    try:
        body = await response.read()
    except aiohttp.ClientError as exc:
        raise GatewayError("the gateway's answer broke off") from exc
    finally:
        response.release()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayError("the gateway's answer is not JSON") from exc


class GatewayClient:
    """POST {GATEWAY_URL}/chat/completions; retries only what cannot have reached a model."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: SecretStr | None,
        timeout_seconds: float,
        max_retries: int,
        retry_after_cap_seconds: float,
        auth_scheme: AuthScheme = "raw",
    ) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self._timeout = timeout_seconds
        self._max_retries = max_retries
        self._retry_after_cap = retry_after_cap_seconds
        self._auth_scheme = auth_scheme
        # Models whose gateway refused `stream_options`: asked once per process, not per turn.
        self._no_stream_usage: set[str] = set()

    @property
    def pass_through(self) -> bool:
        return self._api_key is None

    def _key(self, client_key: str | None) -> str:
        key = self._api_key.get_secret_value() if self._api_key is not None else client_key
        if not key:
            raise Unauthorized("no gateway key")
        return key

    def _headers(self, key: str, request_id: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {key}" if self._auth_scheme == "bearer" else key,
            "X-Request-ID": request_id,
            "Content-Type": "application/json",
            # One per call, the same on each attempt: a gateway that honours it bills once.
            "Idempotency-Key": random_id(),
        }

    async def complete(
        self,
        payload: JSONObject,
        *,
        client_key: str | None,
        request_id: str,
        deadline: float | None = None,
    ) -> tuple[JSONObject, Reply]:
        """One completion: the gateway's JSON as it came, and the parsed reply. `deadline` (loop
        time) ends the call, retries included; by default GATEWAY_TIMEOUT_SECONDS from now."""
        started = time.perf_counter()
        key = self._key(client_key)
        try:
            async with self._deadline(deadline):
                response = await self._send(payload, key, request_id)
                completion = await _read_json(response)
        finally:
            record_upstream_time(started)
        return completion, parse_reply(completion)

    async def open_stream(
        self,
        payload: JSONObject,
        *,
        client_key: str | None,
        request_id: str,
        deadline: float | None = None,
    ) -> UpstreamStream:
        """Start a streamed completion and check its status before anything reaches the client.
        Usage is asked for (`stream_options.include_usage`); a gateway that refuses the field for
        a model is asked again without it, and for that model never again in this process."""
        key = self._key(client_key)
        model = str(payload.get("model"))
        body: JSONObject = {**payload, "stream": True}
        ask_usage = model not in self._no_stream_usage
        if ask_usage:
            given = payload.get("stream_options")
            body["stream_options"] = {
                **(given if isinstance(given, dict) else {}),
                "include_usage": True,
            }
        async with self._deadline(deadline):
            try:
                response = await self._send(body, key, request_id)
            except GatewayRejected as exc:
                if not (ask_usage and exc.status_code == 400 and _names_stream_options(exc.detail)):
                    raise
                if len(self._no_stream_usage) < MAX_REMEMBERED_MODELS:
                    self._no_stream_usage.add(model)
                log.info("gateway refused stream_options", extra={"model": model[:100]})
                body = {k: v for k, v in body.items() if k != "stream_options"}
                response = await self._send(body, key, request_id)
            secrets = self._secrets(key)
            if "text/event-stream" in response.headers.get("content-type", ""):
                return UpstreamStream(response, secrets=secrets)
            return UpstreamStream(response, completion=await _read_json(response), secrets=secrets)

    def _secrets(self, key: str) -> tuple[str, ...]:
        return (key,)

    def _deadline(self, deadline: float | None) -> _Deadline:
        """The turn's deadline over the whole call, retries included: 504 past it."""
        when = (
            deadline if deadline is not None else asyncio.get_running_loop().time() + self._timeout
        )
        return _Deadline(when, self._timeout)

    async def _send(self, payload: JSONObject, key: str, request_id: str) -> aiohttp.ClientResponse:
        """Send, retrying only what cannot have reached a model; returns an open 2xx response
        (the caller reads and releases it)."""
        headers = self._headers(key, request_id)
        body = orjson.dumps(payload)
        attempt = 0
        while True:
            try:
                response = await self._session.post(
                    self._url, data=body, headers=headers, allow_redirects=False
                )
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # No connection was made, so nothing was sent: safe to try again.
                if attempt >= self._max_retries:
                    what = (
                        "connect timeout"
                        if isinstance(exc, aiohttp.ConnectionTimeoutError)
                        else "connection failed"
                    )
                    raise GatewayError(f"could not connect to the gateway ({what})") from exc
                await self._backoff(attempt, None)
                attempt += 1
                continue
            except aiohttp.ServerTimeoutError as exc:  # sent, then no answer within sock_read
                raise GatewayTimeout(
                    f"the gateway did not answer within {self._timeout:g} s"
                ) from exc
            except aiohttp.ClientError as exc:  # sent, then the connection broke: it may be billed
                raise GatewayError(
                    f"the gateway's connection broke off ({type(exc).__name__})"
                ) from exc
            if response.status < 300:
                return response
            try:
                error_body = await response.read()
            finally:
                response.release()
            status = response.status
            retry_after = retry_after_seconds(response.headers.get("retry-after"))
            if (
                status in RETRY_AFTER_STATUSES
                and retry_after is not None
                and retry_after <= self._retry_after_cap
                and attempt < self._max_retries
            ):
                log.info("gateway retry", extra={"upstream_status": status, "attempt": attempt + 1})
                await self._backoff(attempt, retry_after)
                attempt += 1
                continue
            raise upstream_error(
                status,
                error_body,
                dict(response.headers),
                secrets=self._secrets(key),
                pass_through=self.pass_through,
            )

    async def _backoff(self, attempt: int, retry_after: float | None) -> None:
        if retry_after is not None:
            delay = retry_after
        else:  # full jitter, capped
            delay = random.uniform(0, min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt))  # noqa: S311 - jitter, not security
        metrics.UPSTREAM_RETRIES.inc()
        await asyncio.sleep(delay)


def _names_stream_options(detail: str) -> bool:
    lowered = detail.lower()
    return "stream_options" in lowered or "include_usage" in lowered
