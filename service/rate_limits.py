"""Per-tenant and per-end-user rate limits: token buckets kept in Redis, shared by every replica.

TENANT_RATE bounds every request of a tenant (client keys and its end users alike); END_USER_RATE
bounds each end user (a token's `sub`). Both buckets of a request are checked and taken in one
script call on Redis's clock, so replicas agree and a refused request takes nothing from either.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Protocol

from service.errors import RateLimited

_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400}
_RATE = re.compile(r"^([0-9]{1,9})/(second|minute|hour|day)s?$")
_TENANT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# KEYS: the buckets. ARGV: per bucket, its capacity and the milliseconds it takes to refill
# from empty. A bucket is a hash {t: tokens left, ts: when (ms, Redis's clock)}. All buckets must
# have a token, or none is taken; the answer is {1, remaining...} or {0, bucket index, wait ms}.
TAKE_TOKENS = r"""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local levels = {}
local blocked, wait = 0, 0
for i = 1, #KEYS do
  local cap, period = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local stored = redis.call('HMGET', KEYS[i], 't', 'ts')
  local level, ts = tonumber(stored[1]), tonumber(stored[2])
  if level == nil or ts == nil then
    level, ts = cap, now
  end
  level = math.min(cap, level + math.max(0, now - ts) * cap / period)
  levels[i] = level
  if level < 1 then
    local need = math.ceil((1 - level) * period / cap)
    if need > wait then
      blocked, wait = i, need
    end
  end
end
if blocked > 0 then
  return {0, blocked, wait}
end
local answer = {1}
for i = 1, #KEYS do
  local period = tonumber(ARGV[2 * i])
  redis.call('HSET', KEYS[i], 't', tostring(levels[i] - 1), 'ts', now)
  redis.call('PEXPIRE', KEYS[i], math.ceil(period))
  answer[i + 1] = math.floor(levels[i] - 1)
end
return answer
"""


@dataclass(frozen=True, slots=True)
class Rate:
    limit: int  # requests per period, and the most that may come at once
    period_seconds: int

    def __str__(self) -> str:
        return f"{self.limit};w={self.period_seconds}"


@dataclass(frozen=True, slots=True)
class RateTable:
    """A default rate (None: unlimited) and per-tenant overrides."""

    default: Rate | None = None
    tenants: tuple[tuple[str, Rate], ...] = ()

    def for_tenant(self, tenant: str) -> Rate | None:
        return dict(self.tenants).get(tenant, self.default)

    @property
    def enabled(self) -> bool:
        return self.default is not None or bool(self.tenants)


def parse_rate(raw: str) -> Rate:
    match = _RATE.match(raw.strip().lower())
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"{raw!r}: a rate is <count>/<second|minute|hour|day>, count >= 1")
    return Rate(int(match.group(1)), _PERIODS[match.group(2)])


def parse_rates(raw: str, setting: str) -> RateTable:
    """`20/minute` (every tenant), `acme:100/minute` (one tenant), comma-separated."""
    default: Rate | None = None
    tenants: dict[str, Rate] = {}
    for entry in raw.split(","):
        if not entry.strip():
            continue
        tenant, sep, rate = entry.strip().rpartition(":")
        try:
            parsed = parse_rate(rate)
        except ValueError as exc:
            raise ValueError(f"{setting}: {exc}") from exc
        if not sep:
            default = parsed
        elif _TENANT.match(tenant):
            tenants[tenant] = parsed
        else:
            raise ValueError(f"{setting}: {tenant!r} is not a tenant name")
    return RateTable(default, tuple(tenants.items()))


class _Scripts(Protocol):
    def register_script(self, name: str, source: str) -> None: ...

    async def run_script(self, name: str, keys: list[str], args: list[str | int]) -> Any: ...


def bucket_key(tenant: str, sub: str | None) -> str:
    """Beside the tenant's index (same hash tag), so one script reaches both buckets on a
    Cluster too. A `sub` is hashed: it is the tenant's to choose, any characters, any length."""
    if sub is None:
        return f"conv:{{{tenant}}}:rate"
    return f"conv:{{{tenant}}}:rate:u:{hashlib.sha256(sub.encode()).hexdigest()[:32]}"


def refusal_headers(rate: Rate, wait_ms: int) -> dict[str, str]:
    """Retry-After and the RateLimit-* fields (IETF httpapi draft) of a refused request."""
    seconds = str(max(1, math.ceil(wait_ms / 1000)))
    return {
        "Retry-After": seconds,
        "RateLimit-Limit": str(rate.limit),
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": seconds,
        "RateLimit-Policy": str(rate),
    }


class RateLimiter:
    """Takes one token from each bucket that applies, or refuses with 429."""

    def __init__(self, store: _Scripts, *, tenants: RateTable, end_users: RateTable) -> None:
        self._store = store
        self._tenants = tenants
        self._end_users = end_users
        if self.enabled:
            store.register_script("TAKE_TOKENS", TAKE_TOKENS)

    @property
    def enabled(self) -> bool:
        return self._tenants.enabled or self._end_users.enabled

    async def take(self, tenant: str, sub: str | None) -> None:
        buckets: list[tuple[str, Rate, str]] = []
        tenant_rate = self._tenants.for_tenant(tenant)
        if tenant_rate is not None:
            buckets.append((bucket_key(tenant, None), tenant_rate, "TENANT_RATE"))
        user_rate = self._end_users.for_tenant(tenant) if sub is not None else None
        if user_rate is not None:
            buckets.append((bucket_key(tenant, sub), user_rate, "END_USER_RATE"))
        if not buckets:
            return
        args: list[str | int] = []
        for _, rate, _ in buckets:
            args += [rate.limit, rate.period_seconds * 1000]
        answer = await self._store.run_script("TAKE_TOKENS", [k for k, _, _ in buckets], args)
        if int(answer[0]) == 1:
            return
        _, rate, setting = buckets[int(answer[1]) - 1]
        raise RateLimited(
            f"over {setting} ({rate.limit} per {rate.period_seconds} s); retry later",
            headers=refusal_headers(rate, int(answer[2])),
        )
