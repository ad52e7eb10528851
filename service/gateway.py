"""GatewayClient: calls to the LLM gateway, its retry policy, and its wire format.

One client per process, on one aiohttp session: measured by `make bench`, httpx's client costs
2.3x aiohttp's CPU per call even over the httpx-aiohttp transport (and its own pool is ~10x
slower under concurrency, encode/httpx#3215). Failures become ServiceErrors here, at the
boundary; the gateway's error text is passed to the client but never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr

from service import metrics
from service.errors import (
    GatewayError,
    GatewayRateLimited,
    GatewayRejected,
    GatewayTimeout,
    ServiceError,
    Unauthorized,
)
from service.logs import annotate
from service.models import JSONObject

log = logging.getLogger("service.gateway")

BACKOFF_BASE_SECONDS = 0.25
BACKOFF_CAP_SECONDS = 4.0


@dataclass(frozen=True, slots=True)
class Reply:
    """The parts of a completion the service keeps: the assistant message and usage."""

    message: JSONObject  # role, content, tool_calls where present
    input_tokens: int
    output_tokens: int


@dataclass(slots=True)
class UpstreamStream:
    """An opened streaming call: either SSE lines to relay, or a plain JSON completion
    (a model may ignore `stream: true`)."""

    response: aiohttp.ClientResponse
    completion: JSONObject | None = None
    started: float = field(default_factory=time.perf_counter)

    async def data_lines(self) -> AsyncIterator[str]:
        """The payload of each `data:` line, as it arrives; a broken stream is a GatewayError."""
        try:
            async for raw in self.response.content:
                if raw.startswith(b"data:"):
                    yield raw[5:].strip().decode()
        except TimeoutError as exc:  # no chunk within the time limit (aiohttp's sock_read)
            raise GatewayTimeout("the gateway's stream stalled") from exc
        except aiohttp.ClientError as exc:
            raise GatewayError(f"the gateway's stream broke off ({type(exc).__name__})") from exc

    async def aclose(self) -> None:
        """Return the connection when the stream was read to its end; else drop it, which
        cancels the upstream request (a client that went away)."""
        if self.response.content.at_eof():
            self.response.release()
        else:
            self.response.close()


def record_upstream_time(started: float) -> None:
    """A gateway call's duration (from `started`, a perf_counter reading): metric and log line."""
    elapsed = time.perf_counter() - started
    metrics.UPSTREAM_LATENCY.observe(elapsed)
    annotate(upstream_ms=round(elapsed * 1000, 3))


def parse_reply(completion: Any) -> Reply:
    """Read a completion defensively: tool_calls under the message or (older spec) the choice,
    usage as input/output_tokens or prompt/completion_tokens."""
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
    raw_usage = completion.get("usage")
    usage: JSONObject = raw_usage if isinstance(raw_usage, dict) else {}
    return Reply(
        message=reply,
        input_tokens=usage_count(usage, "input_tokens", "prompt_tokens"),
        output_tokens=usage_count(usage, "output_tokens", "completion_tokens"),
    )


def usage_count(usage: JSONObject, *names: str) -> int:
    for name in names:
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return 0


def _error_text(body: bytes) -> str:
    """The gateway's message plus the specific reasons it listed, from any of its error shapes."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace").strip() or "no details"
    if not isinstance(data, dict):
        return "no details"
    error = data.get("error", data)
    if isinstance(error, str):
        return error
    if not isinstance(error, dict):
        return "no details"
    message = str(error.get("message") or error.get("detail") or error.get("code") or "no details")
    metadata = error.get("metadata")
    reasons = (metadata.get("errors") if isinstance(metadata, dict) else None) or error.get(
        "errors"
    )
    if isinstance(reasons, list) and reasons:
        listed = "; ".join(r if isinstance(r, str) else orjson.dumps(r).decode() for r in reasons)
        return f"{message}: {listed}"
    return message


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


def _retry_after_seconds(raw: str | None) -> float | None:
    """Retry-After as seconds, from either of its forms: delay-seconds or an HTTP date."""
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, float(when.timestamp()) - time.time())


class GatewayClient:
    """POST {GATEWAY_URL}/chat/completions with retries on connection errors, 429 and 5xx."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: SecretStr | None,
        timeout_seconds: float,
        max_retries: int,
        retry_after_cap_seconds: float,
    ) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self._timeout = timeout_seconds
        self._max_retries = max_retries
        self._retry_after_cap = retry_after_cap_seconds

    @property
    def pass_through(self) -> bool:
        return self._api_key is None

    def _headers(self, client_key: str | None, request_id: str) -> dict[str, str]:
        key = self._api_key.get_secret_value() if self._api_key is not None else client_key
        if not key:
            raise Unauthorized("no gateway key")
        return {
            "Authorization": key,
            "X-Request-ID": request_id,
            "Content-Type": "application/json",
        }

    async def complete(
        self, payload: JSONObject, *, client_key: str | None, request_id: str
    ) -> tuple[JSONObject, Reply]:
        """One completion: the gateway's JSON as it came, and the parsed reply."""
        started = time.perf_counter()
        try:
            async with self._deadline():
                response = await self._send(payload, client_key, request_id)
                completion = await _read_json(response)
        finally:
            record_upstream_time(started)
        return completion, parse_reply(completion)

    async def open_stream(
        self, payload: JSONObject, *, client_key: str | None, request_id: str
    ) -> UpstreamStream:
        """Start a streamed completion and check its status before anything reaches the client."""
        async with self._deadline():
            response = await self._send({**payload, "stream": True}, client_key, request_id)
            if "text/event-stream" in response.headers.get("content-type", ""):
                return UpstreamStream(response)
            return UpstreamStream(response, completion=await _read_json(response))

    @contextlib.asynccontextmanager
    async def _deadline(self) -> AsyncIterator[None]:
        """GATEWAY_TIMEOUT_SECONDS over the whole call, retries included: 504 past it."""
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except TimeoutError as exc:  # our deadline, or a read that outlived the time limit
            raise GatewayTimeout(f"the gateway did not answer within {self._timeout:g} s") from exc

    async def _send(
        self, payload: JSONObject, client_key: str | None, request_id: str
    ) -> aiohttp.ClientResponse:
        """Send with retries; returns an open 2xx response (the caller reads and releases it)."""
        headers = self._headers(client_key, request_id)
        body = orjson.dumps(payload)
        attempt = 0
        while True:
            try:
                response = await self._session.post(
                    self._url, data=body, headers=headers, allow_redirects=False
                )
            except TimeoutError:
                raise
            except aiohttp.ClientError as exc:
                if attempt >= self._max_retries:
                    raise GatewayError("the gateway is unreachable (connection failed)") from exc
                await self._backoff(attempt, None)
                attempt += 1
                continue
            if response.status < 300:
                return response
            try:
                error_body = await response.read()
            finally:
                response.release()
            status = response.status
            retry_after = _retry_after_seconds(response.headers.get("retry-after"))
            retryable = status == 429 or status >= 500
            capped = retry_after is not None and retry_after > self._retry_after_cap
            if retryable and attempt < self._max_retries and not capped:
                log.info("gateway retry", extra={"upstream_status": status, "attempt": attempt + 1})
                await self._backoff(attempt, retry_after)
                attempt += 1
                continue
            rate_limits = {
                k: v for k, v in response.headers.items() if k.lower().startswith("x-ratelimit-")
            }
            raise self._error(status, error_body, retry_after, rate_limits)

    async def _backoff(self, attempt: int, retry_after: float | None) -> None:
        if retry_after is not None:
            delay = retry_after
        else:  # full jitter, capped
            delay = random.uniform(0, min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt))  # noqa: S311 - jitter, not security
        metrics.UPSTREAM_RETRIES.inc()
        await asyncio.sleep(delay)

    def _error(
        self, status: int, body: bytes, retry_after: float | None, rate_limits: dict[str, str]
    ) -> ServiceError:
        text = _error_text(body)
        if self._api_key is not None:
            text = text.replace(self._api_key.get_secret_value(), "[redacted]")
        # Status only: the gateway's text can quote message content, which is never logged.
        log.warning("gateway error", extra={"upstream_status": status})
        if status == 429:
            wait = retry_after if retry_after is not None else 1.0
            return GatewayRateLimited(
                f"the gateway's rate limit: {text}",
                headers={**rate_limits, "Retry-After": str(max(1, round(wait)))},
            )
        if status in (401, 403):
            if self.pass_through:
                return Unauthorized(f"the gateway rejected the key: {text}")
            return GatewayError("the gateway rejected the service's key")
        if 400 <= status < 500:
            return GatewayRejected(text, status=status)
        return GatewayError(f"the gateway failed with status {status}: {text}")
