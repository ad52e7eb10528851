"""SummaryStore: the Redis side of rolling summaries, one atomic script per step of a job.

The summary lives in the conversation's metadata hash (`summary_*` fields), so the turn's window
script reads it in the same round trip as the window, `GET /conversations/{id}` shows it, and
`DELETE` removes it with the conversation. The job's lease is its own key under the same hash tag,
`conv:{T:I}:sumlock`, with a TTL: a replica that dies mid-job holds nothing past it.
A new summary is stored only if no other was stored since the job read the previous one (compare
and set on `summary_version`), in the same conversation (`created_at` unchanged: not deleted and
written afresh meanwhile), and if the messages it covers are still there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from service import metrics
from service.models import Message
from service.redis_scripts import RELEASE_LOCK, RENEW_LOCK
from service.store import ConversationRef, RedisClient

# The newest of the two stored summaries (`current`, `next`): its text, how far it reaches, and
# the newest version number of either (the compare-and-set base).
_NEWEST = r"""
local function newest(meta)
  local f = redis.call('HMGET', meta, 'summary_text', 'summary_through', 'summary_version',
                       'summary_next_text', 'summary_next_through', 'summary_next_version')
  local current = f[1] and tonumber(f[2] or '0') or 0
  local upcoming = f[4] and tonumber(f[5] or '0') or 0
  local version = math.max(tonumber(f[3] or '0'), tonumber(f[6] or '0'))
  if upcoming > current then return f[4], upcoming, version end
  return f[1] or '', current, version
end
"""

# KEYS: meta, log, sumlock   ARGV: lease value, lease ms, now, through, max messages.
# Answers {'gone'} | {'backoff'} | {'covered'} | {'busy'}
#       | {'ok', created_at, base version, newest text, its covers_through, messages after it}.
BEGIN = (
    _NEWEST
    + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local retry_at = tonumber(redis.call('HGET', KEYS[1], 'summary_retry_at') or '0')
if retry_at > tonumber(ARGV[3]) then return {'backoff'} end
local text, covered, version = newest(KEYS[1])
local through = math.min(tonumber(ARGV[4]), redis.call('LLEN', KEYS[2]))
if covered >= through then return {'covered'} end
if not redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'busy'} end
local last = math.min(through, covered + tonumber(ARGV[5]))
return {'ok', redis.call('HGET', KEYS[1], 'created_at') or '', tostring(version), text, covered,
        redis.call('LRANGE', KEYS[2], covered, last - 1)}
"""
)

# KEYS: meta, log, sumlock   ARGV: lease value, created_at, base version, covers_through, text,
# model, now, input tokens, output tokens.  Answers 'ok' | 'stale' | 'gone'.
# Stored as `next`: the `current` one stays as it is until a turn forwards the new one.
# The call's usage counts even when its summary is discarded: it was spent.
COMMIT = (
    _NEWEST
    + r"""
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
if redis.call('HGET', KEYS[1], 'created_at') ~= ARGV[2] then return 'gone' end
redis.call('HINCRBY', KEYS[1], 'summary_input_tokens', ARGV[8])
redis.call('HINCRBY', KEYS[1], 'summary_output_tokens', ARGV[9])
local _, _, version = newest(KEYS[1])
if tostring(version) ~= ARGV[3] then return 'stale' end
if redis.call('LLEN', KEYS[2]) < tonumber(ARGV[4]) then return 'stale' end
redis.call('HSET', KEYS[1], 'summary_next_text', ARGV[5], 'summary_next_through', ARGV[4],
           'summary_next_version', version + 1, 'summary_next_by', ARGV[6],
           'summary_next_at', ARGV[7])
redis.call('HDEL', KEYS[1], 'summary_failures', 'summary_retry_at')
return 'ok'
"""
)

# KEYS: meta, sumlock   ARGV: lease value, created_at, now, first back-off s, longest back-off s.
# Counts the failure and sets when the next job may run; answers the consecutive failures.
FAIL = r"""
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
if redis.call('HGET', KEYS[1], 'created_at') ~= ARGV[2] then return 0 end
local failures = redis.call('HINCRBY', KEYS[1], 'summary_failures', 1)
local delay = math.min(tonumber(ARGV[5]), tonumber(ARGV[4]) * 2 ^ math.min(failures - 1, 30))
redis.call('HSET', KEYS[1], 'summary_retry_at', tostring(tonumber(ARGV[3]) + delay))
return failures
"""


Skipped = Literal["gone", "backoff", "covered", "busy"]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _messages(items: Sequence[bytes | str]) -> list[Message]:
    """The uncovered messages; one that does not read back is left out (and counted), as the
    window leaves it out: a summary of the rest beats none."""
    messages = []
    for item in items:
        try:
            messages.append(Message.from_json(item))
        except ValidationError:
            metrics.UNREADABLE_RECORDS.inc()
    return messages


_SKIPPED: dict[str, Skipped] = {
    "gone": "gone",
    "backoff": "backoff",
    "covered": "covered",
    "busy": "busy",
}


@dataclass(frozen=True, slots=True)
class JobStart:
    """A job that holds its conversation's summary lease."""

    created_at: str  # the conversation's, as stored: the commit checks it is unchanged
    base_version: str
    previous: str | None
    covers_through: int
    uncovered: list[Message]  # oldest first, from covers_through + 1


class SummaryStore:
    """Each method is one round trip. Errors are redis-py's own: the job catches them."""

    def __init__(self, redis: RedisClient) -> None:
        self._begin = redis.register_script(BEGIN)
        self._commit = redis.register_script(COMMIT)
        self._fail = redis.register_script(FAIL)
        self._renew = redis.register_script(RENEW_LOCK)
        self._release = redis.register_script(RELEASE_LOCK)

    @staticmethod
    def _keys(ref: ConversationRef) -> list[str]:
        return [ref.key("meta"), ref.key("log"), ref.key("sumlock")]

    async def begin(
        self,
        ref: ConversationRef,
        *,
        lease_value: str,
        lease_ms: int,
        now: float,
        through: int,
        max_messages: int,
    ) -> JobStart | Skipped:
        answer: Sequence[Any] = await self._begin(
            self._keys(ref), [lease_value, lease_ms, repr(now), through, max_messages]
        )
        kind = _text(answer[0])
        if kind != "ok":
            return _SKIPPED[kind]
        previous = _text(answer[3])
        return JobStart(
            created_at=_text(answer[1]),
            base_version=_text(answer[2]),
            previous=previous or None,
            covers_through=int(answer[4]),
            uncovered=_messages(answer[5]),
        )

    async def commit(
        self,
        ref: ConversationRef,
        job: JobStart,
        *,
        lease_value: str,
        covers_through: int,
        text: str,
        model: str,
        now: float,
        input_tokens: int,
        output_tokens: int,
    ) -> Literal["ok", "stale", "gone"]:
        answer = await self._commit(
            self._keys(ref),
            [
                lease_value,
                job.created_at,
                job.base_version,
                covers_through,
                text,
                model,
                repr(now),
                input_tokens,
                output_tokens,
            ],
        )
        outcome = _text(answer)
        return "ok" if outcome == "ok" else "stale" if outcome == "stale" else "gone"

    async def fail(
        self,
        ref: ConversationRef,
        job: JobStart,
        *,
        lease_value: str,
        now: float,
        first_backoff: float,
        max_backoff: float,
    ) -> int:
        return int(
            await self._fail(
                [ref.key("meta"), ref.key("sumlock")],
                [lease_value, job.created_at, repr(now), repr(first_backoff), repr(max_backoff)],
            )
        )

    async def renew(self, ref: ConversationRef, lease_value: str, lease_ms: int) -> bool:
        return bool(await self._renew([ref.key("sumlock")], [lease_value, lease_ms]))

    async def release(self, ref: ConversationRef, lease_value: str) -> None:
        await self._release([ref.key("sumlock")], [lease_value])
