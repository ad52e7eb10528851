"""What of a gateway failure reaches our client: status, a redacted detail, chosen headers.

The contract passes on the gateway's message and the reasons it listed (`metadata.errors`), never
its raw body; on 429 its `Retry-After` and the rate-limit headers listed here, no other header.
Statuses that would collide with the service's own meanings are mapped (see README, "Errors").
"""

from __future__ import annotations

import logging
import re
import time
from email.utils import parsedate_to_datetime

import orjson

from service.errors import (
    GatewayError,
    GatewayRateLimited,
    GatewayRejected,
    ServiceError,
    Unauthorized,
)

log = logging.getLogger("service.gateway")

MAX_DETAIL_CHARS = 2000
# A leading part of a key this long is as good as the key to whoever holds the rest of it, and
# gateways often echo a truncated key ("invalid key gw-abcdef12..."): redact from it onwards.
REDACT_PREFIX_CHARS = 10
RATE_LIMIT_HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)
_HEADER_VALUE = re.compile(r"^[A-Za-z0-9.:, +-]{1,64}$")
# Gateway statuses whose own meaning here is another one: 404 = no conversation, 409 = busy,
# 413 = body or new messages too big, 415 = body not JSON. None: the gateway failed (502).
_REMAPPED: dict[int, int | None] = {404: 422, 413: 422, 409: None, 415: None}


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """`text` with each secret, in any letter case, and anything that starts like one, removed."""
    for secret in secrets:
        if not secret:
            continue
        prefix = re.escape(secret[:REDACT_PREFIX_CHARS])
        text = re.sub(prefix + r"[^\s\"',;]*", "[redacted]", text, flags=re.IGNORECASE)
    return text


def error_text(body: bytes) -> str:
    """The gateway's message plus the specific reasons it listed, from any of its error shapes;
    never the body itself (an HTML error page, a proxy's dump of our request)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "no details"
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


def retry_after_seconds(raw: str | None) -> float | None:
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


def rate_limit_headers(headers: dict[str, str], secrets: tuple[str, ...]) -> dict[str, str]:
    """The listed rate-limit headers whose values look like counts, durations or dates."""
    lowered = {k.lower(): v for k, v in headers.items()}
    chosen = {}
    for name in RATE_LIMIT_HEADERS:
        value = lowered.get(name)
        if value is not None and _HEADER_VALUE.match(value) and redact(value, secrets) == value:
            chosen[name] = value
    return chosen


def upstream_error(
    status: int,
    body: bytes,
    headers: dict[str, str],
    *,
    secrets: tuple[str, ...],
    pass_through: bool,
) -> ServiceError:
    """The ServiceError for a gateway answer with a status of 400 or more."""
    text = redact(error_text(body), secrets)[:MAX_DETAIL_CHARS]
    # Status only: the gateway's text can quote message content, which is never logged.
    log.warning("gateway error", extra={"upstream_status": status})
    if status == 429:
        wait = retry_after_seconds({k.lower(): v for k, v in headers.items()}.get("retry-after"))
        return GatewayRateLimited(
            f"the gateway's rate limit: {text}",
            headers={
                **rate_limit_headers(headers, secrets),
                "Retry-After": str(max(1, round(wait if wait is not None else 1.0))),
            },
        )
    if status in (401, 403):
        if pass_through:
            return Unauthorized(f"the gateway rejected the key: {text}")
        return GatewayError("the gateway rejected the service's key")
    if 400 <= status < 500:
        mapped = _REMAPPED.get(status, status)
        if mapped is None:
            return GatewayError(f"the gateway refused the request with status {status}: {text}")
        if mapped != status:
            text = f"the gateway answered {status}: {text}"
        return GatewayRejected(text, status=mapped)
    return GatewayError(f"the gateway failed with status {status}: {text}")
